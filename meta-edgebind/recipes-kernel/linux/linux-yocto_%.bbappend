# Landlock for the agent's action sandbox (QEMU and generic machines).
require recipes-kernel/linux/edgebind-landlock.inc
