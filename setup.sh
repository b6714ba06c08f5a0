#!/usr/bin/env bash
# Install what kernel-lab needs on Debian 12: the host tools (QEMU, the
# Linux 6.12 source, kernel build tools, the MIPS cross compiler) and the
# Python package with its dependencies. Run as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
	# kernel source and build
	linux-source-6.12 build-essential flex bison bc libelf-dev libssl-dev
	cpio ccache lz4 xz-utils patch git kmod
	# SELinux: checkpolicy compiles the dummy policy of the stock-LSM checks
	checkpolicy
	# virtme-ng: its guest init needs udevd for the script I/O ports
	udev
	# --lab-transport ssh: the guest runs this sshd binary (no system sshd)
	openssh-server
	# BTF for the BPF LSM: pahole, bpftool, clang, static libbpf
	dwarves bpftool clang llvm libbpf-dev zlib1g-dev libzstd-dev
	# machines: x86_64 and MIPS Malta, and MIPS cross tools
	qemu-system-x86 qemu-system-mips gcc-mips-linux-gnu libc6-dev-mips-cross
	# Python
	python3 python3-pip python3-venv
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
	SUDO=sudo
fi

echo "[setup] apt packages: ${APT_PACKAGES[*]}"
$SUDO apt-get update -q

# The lab only copies /usr/sbin/sshd into its guests: installing
# openssh-server must not start an sshd on this host's port 22. A
# policy-rc.d that answers 101 ("action forbidden") keeps the package from
# starting it; one of the host's own is left as it is.
POLICY_RC=/usr/sbin/policy-rc.d
ADDED_POLICY_RC=""
remove_policy_rc() {
	if [ -n "$ADDED_POLICY_RC" ]; then
		$SUDO rm -f "$POLICY_RC"
		ADDED_POLICY_RC=""
	fi
}
trap remove_policy_rc EXIT
SSHD_WAS_INSTALLED=""
if dpkg-query -W -f='${Status}' openssh-server 2>/dev/null | grep -q "install ok installed"; then
	SSHD_WAS_INSTALLED=1
fi
if [ ! -e "$POLICY_RC" ]; then
	printf '#!/bin/sh\n# kernel-lab setup.sh: no service starts while it installs\nexit 101\n' |
		$SUDO tee "$POLICY_RC" >/dev/null
	$SUDO chmod 755 "$POLICY_RC"
	ADDED_POLICY_RC=1
fi
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}"
remove_policy_rc
if [ -z "$SSHD_WAS_INSTALLED" ] && [ -d /run/systemd/system ]; then
	# Installed here for the lab: not started at the next boot either.
	$SUDO systemctl disable ssh.service ssh.socket >/dev/null 2>&1 || true
	echo "[setup] openssh-server installed for the lab's guests; its service is disabled"
fi

PYTHON=${PYTHON:-python3}
if "$PYTHON" -c 'import sys, sysconfig, os; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
	# Debian's own Python refuses pip installs: use a venv in the checkout.
	"$PYTHON" -m venv .venv
	PYTHON=.venv/bin/python
	echo "[setup] using a virtual environment: . .venv/bin/activate before running pytest"
fi
echo "[setup] pip install -e .[dev] with $PYTHON"
"$PYTHON" -m pip install -q -e '.[dev]'

echo "[setup] done: $("$PYTHON" -m pytest --version 2>&1 | head -1), $(qemu-system-x86_64 --version | head -1)"
