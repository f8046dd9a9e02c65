"""One module per ``ccidbridge`` sub-command (see ccidbridge.cli)."""
