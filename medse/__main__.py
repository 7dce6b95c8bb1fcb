from medse.cli import _entry

_entry()
