SUMMARY = "Edgebind system policy: data partition mounts, journal and SSH settings"
DESCRIPTION = "Mounts the agent state, the persistent journal and timesyncd's \
               clock from the writable data partition of the read-only \
               Edgebind image, caps the journal, silences resolved's LLMNR/mDNS responders and, when \
               SSH is enabled, restricts sshd to public keys for a non-root user."
HOMEPAGE = "https://github.com/edgebind/edgebind"
BUGTRACKER = "https://github.com/edgebind/edgebind/issues"
CVE_PRODUCT = "edgebind"
SECTION = "base"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = "file://var-lib-edgebind.mount \
           file://var-log-journal.mount \
           file://var-lib-systemd-timesync.mount \
           file://50-edgebind-journald.conf \
           file://50-edgebind-sshd.conf \
           file://50-edgebind-resolved.conf \
           "

S = "${UNPACKDIR}"

inherit allarch systemd

SYSTEMD_PACKAGES = "${PN}"
SYSTEMD_SERVICE:${PN} = "var-lib-edgebind.mount var-log-journal.mount var-lib-systemd-timesync.mount"

PACKAGES =+ "${PN}-ssh"

do_install() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/var-lib-edgebind.mount ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/var-log-journal.mount ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/var-lib-systemd-timesync.mount ${D}${systemd_system_unitdir}/

    install -d ${D}${systemd_unitdir}/journald.conf.d
    install -m 0644 ${S}/50-edgebind-journald.conf ${D}${systemd_unitdir}/journald.conf.d/
    install -d ${D}${systemd_unitdir}/resolved.conf.d
    install -m 0644 ${S}/50-edgebind-resolved.conf ${D}${systemd_unitdir}/resolved.conf.d/

    # Mount point of the data partition and the layout wic copies into it
    # (edgebind-*.wks.in: --change-directory=data).
    install -d -m 0755 ${D}/data/edgebind ${D}/data/journal ${D}/data/timesync
    install -d -m 0755 ${D}${localstatedir}/lib/edgebind ${D}${localstatedir}/lib/systemd/timesync

    install -d ${D}${sysconfdir}/ssh/sshd_config.d
    install -m 0644 ${S}/50-edgebind-sshd.conf ${D}${sysconfdir}/ssh/sshd_config.d/
}

FILES:${PN} += "${systemd_system_unitdir} \
                ${systemd_unitdir}/journald.conf.d \
                ${systemd_unitdir}/resolved.conf.d \
                /data \
                ${localstatedir}/lib/edgebind \
                ${localstatedir}/lib/systemd/timesync"
FILES:${PN}-ssh += "${sysconfdir}/ssh/sshd_config.d"
RDEPENDS:${PN}-ssh = "openssh-sshd"
