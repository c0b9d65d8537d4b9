"""kmipd: a key manager daemon for storage systems."""
