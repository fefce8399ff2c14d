"""The layer tests: the contract battery that every layer joins."""
