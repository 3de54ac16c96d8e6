# Mounts things, so it always runs itself in a fresh private mount namespace:
#   sh THIS_SCRIPT > out.mountinfo
if [ "${AMOUNTD_PRIVATE_NS:-}" != 1 ]; then
  exec env AMOUNTD_PRIVATE_NS=1 unshare -m --propagation private sh "$0" "$@"
fi
set -e
B=/tmp/mi_cap/base
mkdir -p $B
mount -t tmpfs basefs $B
mkdir -p $B/s0 $B/s1 $B/chroot/p $B/chroot/q $B/chroot/proc
mount -t tmpfs s0 $B/s0
mount --make-shared $B/s0
mount --bind $B/s0 $B/chroot/p
mount --bind $B/s0 $B/s1
mount --make-slave $B/s1
mount --make-shared $B/s1
mount --bind $B/s1 $B/chroot/q
mount --make-slave $B/chroot/q
mount -t proc proc $B/chroot/proc
"${PYTHON:-python3}" -c "
import os,sys
os.chroot('$B/chroot'); os.chdir('/')
sys.stdout.buffer.write(open('/proc/self/mountinfo','rb').read())
"
