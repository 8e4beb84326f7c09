# edgebind_image: the image policy of Edgebind devices, for image recipes.
#
# What a device image must be (hardened, read-only root, no package manager or
# compiler, no password logins, a default-deny firewall) and the switches that
# change it, in one class so that image recipes stay a few lines (as oe-core's
# core-image and meta-mender's mender-* classes do):
#
#   inherit core-image edgebind_image
#   IMAGE_INSTALL += "my-application"
#
# Switches (local.conf or a kas file; see the layer README): EDGEBIND_PROVISIONING,
# EDGEBIND_SSH, EDGEBIND_SSH_AUTHORIZED_KEYS, EDGEBIND_TEST_ACCESS,
# EDGEBIND_WKS_LAYOUT, EDGEBIND_DATA_SIZE_MB.

inherit core-image extrausers

# ---- user switches ----------------------------------------------------------
# How a unit gets its identity on first boot (read by edgebind-identity-import
# from ${sysconfdir}/edgebind/provisioning):
#   "bundle": the factory writes each unit's own bundle (device key and
#             certificate) onto its boot partition (`edgebind image personalize`,
#             `edgebind factory run`);
#   "claim":  every unit of a batch boots the same golden image holding the
#             batch's claim bundle (`edgebind factory claim-identity`); the agent
#             makes its own key on the device and asks the fleet for its
#             certificate on the broker's provisioning listener.
EDGEBIND_PROVISIONING ??= "bundle"

# "1": install sshd with public-key logins for the user edgeadmin only, keys
# from the build-host file EDGEBIND_SSH_AUTHORIZED_KEYS; never root.
EDGEBIND_SSH ??= "0"
EDGEBIND_SSH_AUTHORIZED_KEYS ??= ""
# "1": QEMU testimage only (kas/include/edgebind-testimage.yml adds the
# password-less root SSH features oeqa needs). Never ship such an image.
EDGEBIND_TEST_ACCESS ??= "0"
# Partition layout: "pcbios" (PC/QEMU) or "rpi" (Raspberry Pi firmware).
EDGEBIND_WKS_LAYOUT ??= "pcbios"
# Size of the data partition (agent state + persistent journal), in MiB.
EDGEBIND_DATA_SIZE_MB ??= "256"

IMAGE_FEATURES += "read-only-rootfs \
                   ${@oe.utils.conditional('EDGEBIND_SSH', '1', 'ssh-server-openssh', '', d)} \
                  "

IMAGE_INSTALL = "packagegroup-core-boot \
                 edgebind-agent \
                 edgebind-agent-sysctl \
                 edgebind-action-selftest \
                 edgebind-system \
                 iptables \
                 ${@oe.utils.conditional('EDGEBIND_SSH', '1', 'edgebind-system-ssh', '', d)} \
                 ${@oe.utils.conditional('EDGEBIND_TEST_ACCESS', '1', 'systemd-analyze', '', d)} \
                 ${CORE_IMAGE_EXTRA_INSTALL} \
                "
IMAGE_LINGUAS = ""

# Features that must never reach a device: package management, compilers,
# debug tooling, password-less logins (the latter tolerated only with
# EDGEBIND_TEST_ACCESS = "1"). Checked before the root file system is made.
EDGEBIND_FORBIDDEN_FEATURES = "package-management tools-sdk tools-debug tools-profile dev-pkgs dbg-pkgs \
                               ptest-pkgs staticdev-pkgs serial-autologin-root post-install-logging"
EDGEBIND_TEST_ONLY_FEATURES = "empty-root-password allow-empty-password allow-root-login"

python edgebind_check_policy() {
    provisioning = d.getVar('EDGEBIND_PROVISIONING')
    if provisioning not in ('bundle', 'claim'):
        bb.fatal('edgebind-image: EDGEBIND_PROVISIONING = "%s": use "bundle" or "claim"' % provisioning)
    features = set(d.getVar('IMAGE_FEATURES').split())
    forbidden = set(d.getVar('EDGEBIND_FORBIDDEN_FEATURES').split())
    if d.getVar('EDGEBIND_TEST_ACCESS') == '1':
        bb.warn('edgebind-image: EDGEBIND_TEST_ACCESS = "1": root may log in without a password (QEMU testimage). Never ship this image.')
    else:
        forbidden |= set(d.getVar('EDGEBIND_TEST_ONLY_FEATURES').split())
    bad = sorted(features & forbidden)
    if bad:
        bb.fatal('edgebind-image: IMAGE_FEATURES %s are not allowed on Edgebind devices' % ' '.join(bad))
    if d.getVar('EDGEBIND_SSH') == '1' and not d.getVar('EDGEBIND_SSH_AUTHORIZED_KEYS'):
        bb.fatal('edgebind-image: EDGEBIND_SSH = "1" needs EDGEBIND_SSH_AUTHORIZED_KEYS (a file of public keys)')
}
edgebind_check_policy[doc] = "Refuse image features that must never reach an Edgebind device"
do_rootfs[prefuncs] += "edgebind_check_policy"

# Root is locked (no password, no shell) unless the test image needs it; the
# SSH user, if any, has no password either ('*': key logins only).
EXTRA_USERS_PARAMS = "\
    ${@oe.utils.conditional('EDGEBIND_TEST_ACCESS', '1', '', 'usermod -L -s ${sbindir}/nologin root;', d)} \
    ${@oe.utils.conditional('EDGEBIND_SSH', '1', "useradd -m -d /home/edgeadmin -s /bin/sh -p '*' edgeadmin;", '', d)} \
"

ROOTFS_POSTPROCESS_COMMAND += "edgebind_firewall_ssh_rule edgebind_authorized_keys edgebind_no_tools edgebind_provisioning_mode"

edgebind_provisioning_mode() {
    install -d ${IMAGE_ROOTFS}${sysconfdir}/edgebind
    echo "${EDGEBIND_PROVISIONING}" > ${IMAGE_ROOTFS}${sysconfdir}/edgebind/provisioning
    chmod 0644 ${IMAGE_ROOTFS}${sysconfdir}/edgebind/provisioning
}
edgebind_provisioning_mode[doc] = "Record which kind of identity bundle the first-boot import accepts"

# Whatever IMAGE_INSTALL pulled in: no package manager or compiler on a device.
EDGEBIND_FORBIDDEN_COMMANDS = "opkg rpm dnf apt apt-get dpkg gcc cc c++ g++ clang rustc cargo make as ld"
edgebind_no_tools() {
    found=""
    for cmd in ${EDGEBIND_FORBIDDEN_COMMANDS}; do
        for dir in ${base_bindir} ${bindir} ${base_sbindir} ${sbindir}; do
            if [ -e "${IMAGE_ROOTFS}$dir/$cmd" ] || [ -L "${IMAGE_ROOTFS}$dir/$cmd" ]; then
                found="$found $dir/$cmd"
            fi
        done
    done
    if [ -n "$found" ]; then
        bbfatal "edgebind-image: package managers/compilers in the root file system:$found"
    fi
}
edgebind_no_tools[doc] = "Fail the image if a package manager or compiler ended up in it"

edgebind_firewall_ssh_rule() {
    # Port 22 is let in only when an SSH server is part of the image.
    if ! ${@bb.utils.contains_any('IMAGE_FEATURES', 'ssh-server-openssh ssh-server-dropbear', 'true', 'false', d)}; then
        for rules in ${IMAGE_ROOTFS}${sysconfdir}/iptables/iptables.rules ${IMAGE_ROOTFS}${sysconfdir}/iptables/ip6tables.rules; do
            if [ -f "$rules" ]; then
                sed -i -e '/edgebind-ssh/d' -e '/--dport 22 /d' "$rules"
            fi
        done
    fi
}
edgebind_firewall_ssh_rule[doc] = "Drop the firewall's SSH rule from images without an SSH server"

edgebind_authorized_keys() {
    if [ "${EDGEBIND_SSH}" = "1" ]; then
        [ -r "${EDGEBIND_SSH_AUTHORIZED_KEYS}" ] || bbfatal "EDGEBIND_SSH_AUTHORIZED_KEYS=${EDGEBIND_SSH_AUTHORIZED_KEYS} is not readable"
        home=${IMAGE_ROOTFS}/home/edgeadmin
        ids=$(awk -F: '$1 == "edgeadmin" { print $3 ":" $4 }' ${IMAGE_ROOTFS}${sysconfdir}/passwd)
        install -d -m 0700 $home/.ssh
        install -m 0600 ${EDGEBIND_SSH_AUTHORIZED_KEYS} $home/.ssh/authorized_keys
        chown -R $ids $home/.ssh
    fi
}
edgebind_authorized_keys[doc] = "Install the SSH user's authorized_keys when EDGEBIND_SSH is on"
do_rootfs[file-checksums] += "${@'${EDGEBIND_SSH_AUTHORIZED_KEYS}:True' if d.getVar('EDGEBIND_SSH_AUTHORIZED_KEYS') else ''}"

# Partitions: FAT boot (firmware/kernel + the factory identity bundle),
# read-only root, ext4 data (/data -> /var/lib/edgebind, /var/log/journal).
WKS_FILE = "edgebind-${EDGEBIND_WKS_LAYOUT}.wks.in"
WKS_FILE_DEPENDS:append = " e2fsprogs-native dosfstools-native mtools-native"
IMAGE_FSTYPES:append = " wic"
