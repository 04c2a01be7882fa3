"""The compiler: a validated module description and a site context become a runnable torch module."""
