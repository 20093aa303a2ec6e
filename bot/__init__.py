"""The Discord front end and the ``imagine`` command line (the composition root).

Importing this package never imports torch or diffusers; the generation
engine is imported lazily where it is needed.
"""
