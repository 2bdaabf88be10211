"""politune: the PoliTune method as a DVC pipeline. One module per stage."""
