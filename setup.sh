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
	# sshd: the --lab-transport ssh guests run this binary, and the
	# --lab-host tests start their own on 127.0.0.1 (never the system's
	# service: see policy-rc.d below)
	openssh-server openssh-client
	# BTF for the BPF LSM: pahole, bpftool, clang, static libbpf
	dwarves bpftool clang llvm libbpf-dev zlib1g-dev libzstd-dev
	# LAVA: lava-run runs the jobs that `lab lava-job` exports, here
	lava-dispatcher
	# machines: x86_64 and MIPS Malta, and MIPS cross tools
	qemu-system-x86 qemu-system-mips gcc-mips-linux-gnu libc6-dev-mips-cross
	# Python
	python3 python3-pip python3-venv
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
	SUDO=sudo
fi

# Installing openssh-server would start a system sshd on port 22: a
# policy-rc.d that exits 101 tells the package scripts not to start any
# service. One already there (as in Docker images) is left as it is.
POLICY=/usr/sbin/policy-rc.d
OWN_POLICY=""
if [ ! -e "$POLICY" ]; then
	printf '#!/bin/sh\n# kernel-lab setup.sh: start no service while installing\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
	$SUDO chmod 755 "$POLICY"
	OWN_POLICY=1
	trap '$SUDO rm -f "$POLICY"' EXIT
fi

HAD_SSHD=""
if dpkg-query -W -f='${Status}' openssh-server 2>/dev/null | grep -q "ok installed"; then
	HAD_SSHD=1
fi

echo "[setup] apt packages: ${APT_PACKAGES[*]}"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${APT_PACKAGES[@]}"
if [ -n "$OWN_POLICY" ]; then
	$SUDO rm -f "$POLICY"
	trap - EXIT
fi
# Newly installed on a host with systemd: nor at boot. An sshd the host
# had before is its own business and left alone.
if [ -z "$HAD_SSHD" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
	$SUDO systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
	echo "[setup] openssh-server installed for the lab; its system service is disabled"
fi

# lava-dispatcher brings the services of a LAVA worker: lava-worker (a
# client of a LAVA server, polling http://localhost/ by default) and
# lava-dispatcher-host (a unix socket). The lab only runs lava-run by hand:
# keep them stopped where systemd runs (elsewhere nothing started them).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
	echo "[setup] stopping and disabling lava-worker and lava-dispatcher-host"
	$SUDO systemctl disable --now lava-worker.service \
		lava-dispatcher-host.socket lava-dispatcher-host.service
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
