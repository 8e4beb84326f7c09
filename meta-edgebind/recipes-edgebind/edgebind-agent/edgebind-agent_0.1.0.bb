SUMMARY = "Edgebind device agent"
DESCRIPTION = "Connects the device to the Edgebind fleet broker over mutual \
               TLS MQTT, reports status and telemetry and runs remote actions, \
               as an unprivileged, sandboxed systemd service. Its identity is \
               imported on first boot from the boot partition."
HOMEPAGE = "https://github.com/edgebind/edgebind"
BUGTRACKER = "https://github.com/edgebind/edgebind/issues"
SECTION = "net"
# The agent is Apache-2.0 (workspace Cargo.toml); the statically linked
# crates are MIT/Apache-2.0/ISC/BSD-3-Clause/Unicode-3.0 (ring: ISC + OpenSSL
# style), recorded per crate in the SPDX SBOM.
LICENSE = "Apache-2.0 & MIT & ISC & BSD-3-Clause & Unicode-3.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10 \
                    file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302 \
                    file://${COMMON_LICENSE_DIR}/ISC;md5=f3b90e78ea0cffb20bf5cca7947a896d \
                    file://${COMMON_LICENSE_DIR}/BSD-3-Clause;md5=550794465ba0ec5312d6919e203a55f9 \
                    file://${COMMON_LICENSE_DIR}/Unicode-3.0;md5=548c7e11b6a9486e064814cf1c708e5b"

# Source: the Edgebind repository (a Cargo workspace). Local builds use this
# very checkout through externalsrc (kas/include/edgebind-local-source.yml
# sets EDGEBIND_GIT_URI = "" and EXTERNALSRC = EDGEBIND_REPO_ROOT); a release
# build sets EDGEBIND_GIT_URI and EDGEBIND_SRCREV to the tagged commit instead.
EDGEBIND_GIT_URI ?= "git://github.com/edgebind/edgebind.git;protocol=https;branch=main"
EDGEBIND_SRCREV ??= "INVALID"
SRC_URI = "${EDGEBIND_GIT_URI} \
           file://edgebind-agent.service \
           file://edgebind-identity-import.service \
           file://edgebind-identity-import \
           file://edgebind-reboot.path \
           file://edgebind-reboot.service \
           file://edgebind-agent.sysusers \
           file://edgebind-agent.tmpfiles \
           file://60-edgebind-hardening.conf \
           file://60-edgebind-serial.rules \
           "
SRCREV = "${EDGEBIND_SRCREV}"
CVE_PRODUCT = "edgebind"

# The checkout holding this recipe: meta-edgebind/recipes-edgebind/edgebind-agent/../../..
EDGEBIND_REPO_ROOT = "${@os.path.normpath(os.path.join(d.getVar('FILE_DIRNAME'), '..', '..', '..'))}"

# Every crates.io crate the agent build needs and no other, fetched with
# crate:// (do_fetch) and vendored; cargo then builds --frozen/offline from
# agent-workspace/, the agent's own build workspace (the agent, protocol and link
# sources, the root Cargo.lock pruned to their crates). Generated with
# `edgebind image crates-inc`; CI checks it and builds the agent offline from
# exactly these crates (tests/layer/agent-offline-build).
require ${BPN}-crates.inc

inherit cargo systemd useradd

# Build only the agent, from its build workspace (see above).
CARGO_SRC_DIR = "agent-workspace"
CARGO_BUILD_FLAGS += "--package edgebind-agent --bin edgebind-agent"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --user-group --home-dir ${localstatedir}/lib/edgebind \
                       --no-create-home --shell ${sbindir}/nologin edgebind"

SYSTEMD_PACKAGES = "${PN}"
SYSTEMD_SERVICE:${PN} = "edgebind-agent.service edgebind-identity-import.service edgebind-reboot.path"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

PACKAGES =+ "${PN}-sysctl"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${UNPACKDIR}/edgebind-agent.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${UNPACKDIR}/edgebind-identity-import.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${UNPACKDIR}/edgebind-reboot.path ${D}${systemd_system_unitdir}/
    install -m 0644 ${UNPACKDIR}/edgebind-reboot.service ${D}${systemd_system_unitdir}/

    install -d ${D}${libexecdir}
    install -m 0755 ${UNPACKDIR}/edgebind-identity-import ${D}${libexecdir}/

    install -d ${D}${nonarch_libdir}/sysusers.d ${D}${nonarch_libdir}/tmpfiles.d ${D}${nonarch_libdir}/sysctl.d
    install -m 0644 ${UNPACKDIR}/edgebind-agent.sysusers ${D}${nonarch_libdir}/sysusers.d/edgebind-agent.conf
    install -m 0644 ${UNPACKDIR}/edgebind-agent.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/edgebind-agent.conf
    install -m 0644 ${UNPACKDIR}/60-edgebind-hardening.conf ${D}${nonarch_libdir}/sysctl.d/

    # The unit's DMI serial readable by the agent (claim first boot on x86).
    install -d ${D}${nonarch_base_libdir}/udev/rules.d
    install -m 0644 ${UNPACKDIR}/60-edgebind-serial.rules ${D}${nonarch_base_libdir}/udev/rules.d/
}

FILES:${PN} += "${systemd_system_unitdir} \
                ${libexecdir}/edgebind-identity-import \
                ${nonarch_libdir}/sysusers.d/edgebind-agent.conf \
                ${nonarch_libdir}/tmpfiles.d/edgebind-agent.conf \
                ${nonarch_base_libdir}/udev/rules.d/60-edgebind-serial.rules"
FILES:${PN}-sysctl += "${nonarch_libdir}/sysctl.d/60-edgebind-hardening.conf"

# The identity import script: tar, sed, grep, mktemp, chown (busybox or
# coreutils).
RDEPENDS:${PN} = "${VIRTUAL-RUNTIME_base-utils}"
RRECOMMENDS:${PN} = "${PN}-sysctl"
