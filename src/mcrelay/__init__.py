"""mcrelay: Linux multicast router and relay."""

__version__ = "0.1.0"
