# Mounts things, so it always runs itself in a fresh private mount namespace:
#   sh THIS_SCRIPT > out.mountinfo
if [ "${AMOUNTD_PRIVATE_NS:-}" != 1 ]; then
  exec env AMOUNTD_PRIVATE_NS=1 unshare -m --propagation private sh "$0" "$@"
fi
set -e
B=/tmp/mi_cap/base
mkdir -p $B
mount -t tmpfs basefs $B
mount --make-shared $B
mkdir -p "$B/with space" "$B/tab	here" "$B/back\\slash" "$B/$(printf 'nl\nx')" "$B/$(printf 'bad\377\376')" $B/shared $B/slave $B/peer $B/unb $B/ovl/lower\ dir $B/ovl/upper $B/ovl/work $B/ovl/merged $B/empty $B/pf
mount -t tmpfs "src with space" "$B/with space"
mount -t tmpfs tabsrc "$B/tab	here"
mount -t tmpfs 'back\src' "$B/back\\slash"
mount -t tmpfs nlsrc "$B/$(printf 'nl\nx')"
mount -t tmpfs badsrc "$B/$(printf 'bad\377\376')"
mount -t tmpfs -o size=1m,mode=700 sh $B/shared
mount --make-shared $B/shared
mount --bind $B/shared $B/slave
mount --make-slave $B/slave
mount --make-shared $B/slave
mount -t tmpfs un $B/unb
mount --make-unbindable $B/unb
mount -t tmpfs "" $B/empty || true
mount -t overlay overlay -o "lowerdir=$B/ovl/lower dir,upperdir=$B/ovl/upper,workdir=$B/ovl/work" $B/ovl/merged || true
mount -o remount,ro,bind $B/with\ space
mkdir -p "$B/shared/sub dir"
mount --bind "$B/shared/sub dir" $B/peer
cat /proc/self/mountinfo
