"""The demo's embedded corpus: gathered from this machine's files, checked before a run trains on it."""
