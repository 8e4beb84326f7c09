SUMMARY = "Edgebind example device action: selftest"
DESCRIPTION = "Declares the selftest action (level=quick|full): a read-only \
               check of the root file system, memory and the agent state \
               directory, run by the edgebind-agent on request from the fleet."
HOMEPAGE = "https://github.com/edgebind/edgebind"
BUGTRACKER = "https://github.com/edgebind/edgebind/issues"
CVE_PRODUCT = "edgebind"
SECTION = "base"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = "file://selftest.toml \
           file://edgebind-selftest \
           "

S = "${UNPACKDIR}"

inherit allarch edgebind_action

do_install() {
    install -d ${D}${libexecdir}/edgebind-actions
    install -m 0755 ${S}/edgebind-selftest ${D}${libexecdir}/edgebind-actions/selftest
}

FILES:${PN} += "${libexecdir}/edgebind-actions/selftest"

# df, free, test (busybox or coreutils/procps).
RDEPENDS:${PN} += "${VIRTUAL-RUNTIME_base-utils}"
