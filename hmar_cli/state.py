"""Options shared by every command (set by the root callback)."""
from dataclasses import dataclass


@dataclass
class State:
    debug: bool = False


state = State()
