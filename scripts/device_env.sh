# Source at the start of a device call (scripts/device_carry.sh prepares what it installs):
# installs the carried wheels, assembles the kvwire package in place (the device gets a copy of the
# working tree; setuptools' package-dir mapping of kernels/, server/ and client/ is redone by copying
# them under kvwire/), and puts the carried redis-server on PATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
# A warm box keeps what an earlier call (anyone's) assembled: remove it first, or cp -r would nest this
# tree's copy inside the stale one (kvwire/kernels/kernels) and the stale modules would be imported.
rm -rf kvwire/kernels kvwire/server kvwire/client || return 1
cp -r kernels kvwire/kernels && cp -r server kvwire/server && cp -r client kvwire/client || return 1
cp .carry/proto/*.py kvwire/_proto/ || return 1  # generated here: the box has no grpcio-tools
export PYTHONPATH=$PWD:/tmp/site
export PATH=$PWD/.carry/redis:$PATH
export LD_LIBRARY_PATH=$PWD/.carry/redis:${LD_LIBRARY_PATH:-}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
