# Edgebind distro only: replace oe-core's empty rule sets with a default-deny inbound
# policy (outbound stays open: the agent dials out to the broker).
FILESEXTRAPATHS:prepend:edgebind := "${THISDIR}/${BPN}:"
