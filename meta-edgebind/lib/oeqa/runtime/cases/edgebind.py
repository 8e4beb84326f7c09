#
# SPDX-License-Identifier: Apache-2.0
#
# testimage cases for edgebind-image (QEMU build, EDGEBIND_TEST_ACCESS = "1").
# Run with: TEST_SUITES = "ping ssh edgebind" (kas/include/edgebind-testimage.yml).
#
# The identity test plays the factory line: it makes a throwaway identity
# bundle on the build host (openssl), puts it where `edgebind image personalize`
# would (edgebind/identity.tar on the FAT boot partition) and lets the
# first-boot import unit install it. Later cases depend on it.

import glob
import os
import re
import shutil
import subprocess
import tarfile
import tempfile

from oeqa.core.decorator.depends import OETestDepends
from oeqa.runtime.case import OERuntimeTestCase
from oeqa.runtime.decorator.package import OEHasPackage

AGENT = 'edgebind-agent.service'
IDENTITY = '/var/lib/edgebind/identity'
BOOT_BUNDLE = '/boot/edgebind/identity.tar'
MAX_EXPOSURE = 2.0
# TCP/UDP ports a non-loopback socket may listen on: SSH only exists in the
# test image (and in images built with EDGEBIND_SSH = "1"); 68/546 are the
# DHCP clients of systemd-networkd.
ALLOWED_TCP = {22}
ALLOWED_UDP = {68, 546}


def is_loopback(addr):
    """/proc/net hex address (host byte order per 32-bit word) on loopback?"""
    if len(addr) == 8:  # IPv4: 127.x.y.z ends in 7F on little-endian hosts
        return addr.endswith('7F')
    if addr == '00000000000000000000000001000000':  # ::1
        return True
    # ::ffff:127.x.y.z (IPv4-mapped)
    return addr.startswith('0000000000000000FFFF0000') and addr.endswith('7F')


def host_openssl(td):
    """openssl on the build host: PATH, else the openssl-native component."""
    found = shutil.which('openssl')
    if found:
        return found
    pattern = os.path.join(td.get('COMPONENTS_DIR', ''), td.get('BUILD_ARCH', ''),
                           'openssl-native', 'usr', 'bin', 'openssl')
    for candidate in glob.glob(pattern):
        return candidate
    return None


def make_bundle(openssl, workdir, device_id):
    """A tar of agent.toml, device.crt, device.key, ca.crt (ECDSA P-256)."""
    def run(*args):
        subprocess.run([openssl, *args], cwd=workdir, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # X.509 v3 with the extensions the agent's verifier insists on.
    with open(os.path.join(workdir, 'leaf.ext'), 'w') as f:
        f.write('basicConstraints = critical, CA:FALSE\n'
                'keyUsage = critical, digitalSignature\n'
                'extendedKeyUsage = clientAuth\n')
    run('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'ca.key')
    run('req', '-x509', '-new', '-key', 'ca.key', '-subj', '/CN=edgebind-oeqa-ca',
        '-addext', 'basicConstraints=critical,CA:TRUE',
        '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
        '-days', '2', '-out', 'ca.crt')
    run('ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', 'device.key')
    run('req', '-new', '-key', 'device.key', '-subj', '/CN=%s' % device_id, '-out', 'device.csr')
    run('x509', '-req', '-in', 'device.csr', '-CA', 'ca.crt', '-CAkey', 'ca.key',
        '-CAcreateserial', '-days', '2', '-extfile', 'leaf.ext', '-out', 'device.crt')
    with open(os.path.join(workdir, 'agent.toml'), 'w') as f:
        # No broker answers in QEMU: the agent must stay up and keep retrying.
        f.write('device_id = "%s"\n\n[broker]\nhost = "10.0.2.2"\nport = 8883\n' % device_id)
    tar_path = os.path.join(workdir, 'identity.tar')
    with tarfile.open(tar_path, 'w', format=tarfile.USTAR_FORMAT) as tar:
        for name in ('agent.toml', 'device.crt', 'device.key', 'ca.crt'):
            tar.add(os.path.join(workdir, name), arcname=name)
    return tar_path


class EdgebindTest(OERuntimeTestCase):

    def run_ok(self, command):
        status, output = self.target.run(command)
        self.assertEqual(status, 0, '%s failed (%d):\n%s' % (command, status, output))
        return output.strip()

    @OEHasPackage(['edgebind-agent'])
    def test_identity_import_installs_bundle_and_erases_it(self):
        openssl = host_openssl(self.td)
        self.assertIsNotNone(openssl, 'no openssl on the build host nor an openssl-native '
                             'component: the identity bundle cannot be made')
        with tempfile.TemporaryDirectory() as workdir:
            bundle = make_bundle(openssl, workdir, 'oeqa-dev')
            self.run_ok('mkdir -p /boot/edgebind')
            status, output = self.target.copyTo(bundle, BOOT_BUNDLE)
            self.assertEqual(status, 0, 'copying the bundle failed: %s' % output)

        self.run_ok('systemctl restart edgebind-identity-import.service')
        self.assertEqual(self.run_ok('stat -c "%U %a" ' + IDENTITY + '/device.key'), 'edgebind 600')
        self.assertEqual(self.run_ok('stat -c "%U %a" ' + IDENTITY), 'edgebind 700')
        status, _ = self.target.run('test -e ' + BOOT_BUNDLE)
        self.assertNotEqual(status, 0, 'the bundle (with its private key) is still on the boot partition')
        journal = self.run_ok('journalctl -b -u edgebind-identity-import.service --no-pager')
        self.assertIn('installed the identity for device oeqa-dev', journal)

    @OETestDepends(['edgebind.EdgebindTest.test_identity_import_installs_bundle_and_erases_it'])
    def test_agent_active_as_its_own_user(self):
        self.run_ok('systemctl start ' + AGENT)
        state = self.run_ok('systemctl is-active ' + AGENT)
        self.assertEqual(state, 'active')
        pid = self.run_ok('systemctl show -p MainPID --value ' + AGENT)
        self.assertNotEqual(pid, '0', 'the agent has no main process')
        self.assertEqual(self.run_ok('stat -c %U /proc/' + pid), 'edgebind')
        status = self.run_ok('grep -E "^(CapEff|NoNewPrivs):" /proc/%s/status' % pid)
        self.assertIn('CapEff:\t0000000000000000', status)
        self.assertIn('NoNewPrivs:\t1', status)

    @OEHasPackage(['edgebind-agent'])
    def test_root_filesystem_is_read_only(self):
        mounts = self.run_ok('cat /proc/mounts').splitlines()
        root = [m.split() for m in mounts if m.split()[1] == '/']
        self.assertTrue(root, 'no / in /proc/mounts')
        options = root[-1][3].split(',')
        self.assertIn('ro', options, 'root is mounted %s' % root[-1][3])
        status, _ = self.target.run('touch /usr/edgebind-write-probe')
        self.assertNotEqual(status, 0, '/usr is writable')
        # The state and the journal live on the writable data partition.
        self.run_ok('grep -q " /data " /proc/mounts')
        self.run_ok('grep -q " /var/lib/edgebind " /proc/mounts')
        self.run_ok('grep -q " /var/log/journal " /proc/mounts')

    @OEHasPackage(['edgebind-agent'])
    def test_nothing_listens_beyond_what_the_image_allows(self):
        offenders = []
        for proto, allowed in (('tcp', ALLOWED_TCP), ('tcp6', ALLOWED_TCP),
                               ('udp', ALLOWED_UDP), ('udp6', ALLOWED_UDP)):
            text = self.run_ok('cat /proc/net/%s' % proto)
            for line in text.splitlines()[1:]:
                fields = line.split()
                local, state = fields[1], fields[3]
                # TCP: LISTEN (0A). UDP: unconnected (07); a connected socket
                # (01, e.g. timesyncd talking to its server) listens to no one.
                if state != ('0A' if proto.startswith('tcp') else '07'):
                    continue
                addr, port = local.split(':')
                port = int(port, 16)
                if not is_loopback(addr) and port not in allowed:
                    offenders.append('%s %s:%d' % (proto, addr, port))
        self.assertEqual(offenders, [], 'unexpected listening sockets: %s' % offenders)

    @OEHasPackage(['systemd-analyze'])
    def test_agent_exposure_score_holds(self):
        output = self.run_ok('systemd-analyze security --no-pager ' + AGENT)
        match = re.search(r'Overall exposure level for %s: ([0-9.]+)' % re.escape(AGENT), output)
        self.assertIsNotNone(match, output)
        self.assertLessEqual(float(match.group(1)), MAX_EXPOSURE, output)
