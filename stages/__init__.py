"""Thin DVC stage entry points and the `text2earth` command line."""
