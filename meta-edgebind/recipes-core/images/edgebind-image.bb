SUMMARY = "Edgebind device image"
DESCRIPTION = "Hardened, read-only image for Edgebind fleet devices: the \
               edgebind-agent under systemd, a writable data partition for its \
               state and the journal, a default-deny inbound firewall and no \
               interactive access unless EDGEBIND_SSH enables key-only SSH."
HOMEPAGE = "https://github.com/edgebind/edgebind"
BUGTRACKER = "https://github.com/edgebind/edgebind/issues"
SECTION = "images"
# The image has no CPE of its own; its packages carry theirs into the SBOM.
CVE_PRODUCT = "edgebind"
LICENSE = "MIT"

# core-image first, for tools that tell an image recipe by it; the class inherits it too.
inherit core-image edgebind_image

# Everything else (packages, the hardening policy, the partition layout and the
# switches such as EDGEBIND_PROVISIONING) is the class's: classes/edgebind_image.bbclass.
