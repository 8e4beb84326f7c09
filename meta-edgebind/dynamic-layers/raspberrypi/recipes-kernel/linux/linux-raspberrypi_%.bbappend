# Landlock for the agent's action sandbox (Raspberry Pi kernels; parsed only
# when meta-raspberrypi is in the build, see BBFILES_DYNAMIC in layer.conf).
require recipes-kernel/linux/edgebind-landlock.inc
