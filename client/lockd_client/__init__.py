"""Client library for the lockd lock broker."""
