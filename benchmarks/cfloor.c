/* The C floor: the least a watcher can do per mount change on Linux 6.15+.
 *
 * fanotify_init(FAN_REPORT_MNT), one FAN_MARK_MNTNS mark (FAN_MNT_ATTACH|FAN_MNT_DETACH)
 * on the namespace file given (/proc/PID/ns/mnt), then a blocking read loop: one
 * statmount() per attach (the fields amountd describes a mount by), one line printed and
 * flushed per change ("+ID TARGET" / "-ID"). It prints "ready" once marked. No table,
 * no POLLPRI, no sweeps: what is left when all a watcher does is read and report.
 *
 * cc -O2 -o cfloor cfloor.c && ./cfloor /proc/PID/ns/mnt
 * Constants: /work/shared/kernel-facts.md (x86_64 syscall numbers; the uapi headers of
 * older distributions lack FAN_REPORT_MNT and statmount, so they are spelled out here).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef __NR_fanotify_init
#define __NR_fanotify_init 300
#endif
#ifndef __NR_fanotify_mark
#define __NR_fanotify_mark 301
#endif
#ifndef __NR_statmount
#define __NR_statmount 457
#endif
#define FAN_CLOEXEC 0x1
#define FAN_REPORT_MNT 0x4000
#define FAN_MARK_ADD 0x1
#define FAN_MARK_MNTNS 0x110
#define FAN_MNT_ATTACH 0x01000000ULL
#define FAN_MNT_DETACH 0x02000000ULL
#define FAN_Q_OVERFLOW 0x4000ULL
#define FAN_EVENT_INFO_TYPE_MNT 7
#define NS_GET_MNTNS_ID 0x8008B705UL
/* SB_BASIC | MNT_BASIC | PROPAGATE_FROM | MNT_ROOT | MNT_POINT | FS_TYPE | MNT_OPTS | SB_SOURCE */
#define STATMOUNT_MASK (0x1ULL | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x80 | 0x200)

struct meta {
    uint32_t event_len;
    uint8_t vers, reserved;
    uint16_t metadata_len;
    uint64_t mask;
    int32_t fd, pid;
} __attribute__((packed));

struct mnt_id_req {
    uint32_t size, mnt_ns_fd;
    uint64_t mnt_id, param, mnt_ns_id;
};

static char smbuf[1 << 16];

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s /proc/PID/ns/mnt\n", argv[0]);
        return 2;
    }
    int nsfd = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) {
        perror(argv[1]);
        return 1;
    }
    uint64_t ns_id = 0;
    if (ioctl(nsfd, NS_GET_MNTNS_ID, &ns_id) < 0) {
        perror("NS_GET_MNTNS_ID");
        return 1;
    }
    int fan = (int)syscall(__NR_fanotify_init, FAN_REPORT_MNT | FAN_CLOEXEC, O_RDONLY);
    if (fan < 0) {
        perror("fanotify_init");
        return 1;
    }
    if (syscall(__NR_fanotify_mark, fan, FAN_MARK_ADD | FAN_MARK_MNTNS,
                FAN_MNT_ATTACH | FAN_MNT_DETACH, nsfd, NULL) < 0) {
        perror("fanotify_mark");
        return 1;
    }
    close(nsfd); /* an open ns fd keeps the namespace alive */
    printf("ready\n");
    fflush(stdout);
    static char buf[1 << 16];
    for (;;) {
        ssize_t got = read(fan, buf, sizeof buf);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            perror("read");
            return 1;
        }
        for (ssize_t off = 0; off + (ssize_t)sizeof(struct meta) <= got;) {
            struct meta *m = (struct meta *)(buf + off);
            if (m->event_len < sizeof(struct meta))
                break;
            uint64_t mnt_id = 0;
            for (uint32_t i = m->metadata_len; i + 16 <= m->event_len;) {
                uint8_t type = (uint8_t)buf[off + i];
                uint16_t len;
                memcpy(&len, buf + off + i + 2, 2);
                if (type == FAN_EVENT_INFO_TYPE_MNT)
                    memcpy(&mnt_id, buf + off + i + 8, 8);
                if (len == 0)
                    break;
                i += len;
            }
            if (m->mask & FAN_Q_OVERFLOW) {
                printf("overflow\n");
            } else if (m->mask & FAN_MNT_ATTACH) {
                struct mnt_id_req req = {.size = 32, .mnt_id = mnt_id,
                                         .param = STATMOUNT_MASK, .mnt_ns_id = ns_id};
                const char *target = "?";
                if (syscall(__NR_statmount, &req, smbuf, sizeof smbuf, 0) == 0) {
                    uint64_t mask;
                    uint32_t point;
                    memcpy(&mask, smbuf + 8, 8);
                    memcpy(&point, smbuf + 108, 4);
                    if (mask & 0x10)
                        target = smbuf + 512 + point;
                }
                printf("+%llu %s\n", (unsigned long long)mnt_id, target);
            } else if (m->mask & FAN_MNT_DETACH) {
                printf("-%llu\n", (unsigned long long)mnt_id);
            }
            fflush(stdout);
            off += m->event_len;
        }
    }
}
