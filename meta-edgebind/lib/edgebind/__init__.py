# Python helpers of meta-edgebind's classes (made importable by layer.conf's
# addpylib), kept out of the classes so tests/layer can run them without bitbake.
