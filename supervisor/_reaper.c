/*
 * supervise's in-tree reaper: the direct child of the supervisor.
 *
 * Python's preexec_fn forks the whole parent (milliseconds per spawn for a large
 * embedding process) and cannot keep a tree alive-or-dead with the supervisor.  This
 * tiny program is posix_spawn'ed (vfork-cheap at any parent size) and then:
 *
 *   - marks every inherited fd >= 3 close-on-exec, so nothing of the parent leaks;
 *   - becomes a child subreaper and a session leader, so setsid and double-fork
 *     escapees are reparented to it, never to init;
 *   - forks the command, which in its own session applies the rlimits, a raised
 *     oom_score_adj and PR_SET_PDEATHSIG(SIGKILL) (its parent is this single-threaded
 *     process, so the "thread that forked" caveat does not apply), then execs;
 *   - keeps the tree from undoing its limits: a seccomp filter refuses to set the rlimits
 *     or the scheduling of another process (supervise and this reaper are the same uid),
 *     and a root tree loses CAP_SYS_RESOURCE and CAP_SYS_PTRACE (bounding set included);
 *   - reports setup failures as "E step errno", the command's pid as
 *     "P pid pidfd scoped" (pidfd: it watches the supervisor through a pidfd; scoped: the
 *     tree cannot signal outside itself), its death as
 *     "X pid wstatus utime_us stime_us maxrss_kb own_cpu_us", descendants killed by
 *     SIGXCPU/SIGXFSZ (or SIGKILL at the RLIMIT_CPU hard limit) as "R pid wstatus cpu_us",
 *     and "D own_cpu_us" when no descendant is left; all on the status fd, a socket
 *     (a pipe could be reopened through /proc/PID/fd by the tree, and forged);
 *   - obeys "s SIG" lines on the control fd (signal the whole tree, replying
 *     "s SIG pid..."; SIGTERM is followed by SIGCONT, so a stopped process handles it;
 *     SIGKILL is repeated until the tree is empty);
 *   - when the supervisor dies (pidfd of the parent readable, or EOF on the control
 *     fd) it SIGKILLs the whole tree, so nothing outlives supervise, even a SIGKILLed one.
 *
 * Arguments: key=value words, then "--", then the command (fd=FD is one socket for
 * both directions; status=FD ctl=FD name two one-way fds instead, e.g. two pipes):
 *   fd=FD ppid=PID [cpu=SOFT:HARD] [as=N] [fsize=N[:HARD]] [nofile=N] [oom=N]
 *   [nproc=N] [scope=1] [lfs=MASK] [lnet=MASK] [rule=MASK:PATH]... [netns=1|2]
 *   [gw=FD:PORT] [ipcns=1] [cgroup=DIR] [mnt=1|2] [ro=1] [rw=PATH]... [mask=PATH]...
 *   [nocaps=1] [user=UID:GID[:G,G...]] [rmtmp=DIR] [cwd=DIR] [pass=FD]... -- argv...
 *
 * scope=1 puts the command in a Landlock domain that scopes signals (ABI >= 6): nothing
 * of the tree can stop, kill or ptrace the reaper or the supervisor.  lfs and lnet are
 * the handled filesystem and network access masks of the same domain, and each rule
 * grants MASK beneath PATH (the supervisor computes masks for the kernel's ABI).  The
 * domain and the seccomp filter need no_new_privs (every run sets it), so setuid binaries
 * do not gain privileges in the tree.
 *
 * netns puts the command in a new network namespace (only a loopback of its own, up),
 * entering a user namespace first when that is what it takes without privilege.
 * netns=1: fail when that is refused; netns=2: fall back to the lnet mask of a fallback
 * word "lnetfb=MASK" (Landlock's TCP rules) and go on.
 *
 * gw=FD:PORT (with netns) makes the LLM gateway's listening socket where the tree lives:
 * once the command is in its new network namespace, a TCP socket bound to
 * 127.0.0.1:PORT is made there and sent to the supervisor over FD (SCM_RIGHTS), which
 * serves it from outside; the tree keeps no copy.  Under the Landlock fallback the socket
 * is made the same way in the host's namespace, and the domain lets the tree connect to
 * that one TCP port; if the port is taken there, nothing is sent and no port is opened.
 *
 * nproc=N puts the command in a new user namespace (mapping only its own uid and gid)
 * and sets RLIMIT_NPROC there: since Linux 5.14 the count is per namespace, so it
 * counts the tree's tasks only, not every process of the user on the host.
 *
 * ipcns=1 gives the command an IPC namespace of its own where it may (root, or in the
 * user namespace above): SysV IPC and POSIX message queues then die with the tree.
 * cgroup=DIR[:DIR]... are the cgroups the supervisor made (pids.max, the memory limit,
 * CPU accounting): the command joins them before exec, and this reaper removes them once
 * the tree is empty.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <stddef.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <netinet/in.h>
#include <ftw.h>
#include <grp.h>
#include <linux/securebits.h>
#include <sys/mount.h>
#include <sys/uio.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#endif
#ifndef SYS_landlock_restrict_self
#define SYS_landlock_restrict_self 446
#endif
#ifndef SYS_landlock_add_rule
#define SYS_landlock_add_rule 445
#endif
#define LANDLOCK_SCOPE_SIGNAL_BIT (1ULL << 1)
#define LANDLOCK_RULE_PATH_BENEATH 1
#define LANDLOCK_RULE_NET_PORT 2
#define LANDLOCK_ACCESS_NET_CONNECT_TCP (1ULL << 1)
#define MAX_RULES 256
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

#define MAX_PASS 16
#define MAX_PIDS 65536

static int status_fd = -1, ctl_fd = -1;
static pid_t cmd_pid = -1;
static long long cpu_soft = -1;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n <= 0 || status_fd < 0) return;
    if (n >= (int)sizeof buf) { /* never leave a line unterminated */
        n = sizeof buf - 1;
        buf[n - 1] = '\n';
    }
    ssize_t off = 0;
    while (off < n) {
        ssize_t w = write(status_fd, buf + off, n - off);
        if (w < 0) {
            if (errno == EINTR) continue;
            status_fd = -1; /* the supervisor is gone; keep reaping anyway */
            return;
        }
        off += w;
    }
}

/* Collect the pids of every descendant of `root`, breadth first, through
 * /proc/PID/task/TID/children (no walk of all of /proc). */
static int collect(pid_t root, pid_t *out, int max) {
    int n = 0, head = 0;
    out[n++] = root;
    while (head < n) {
        pid_t p = out[head++];
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/task", (int)p);
        DIR *d = opendir(path);
        if (!d) continue;
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.') continue;
            char cpath[320];
            snprintf(cpath, sizeof cpath, "/proc/%d/task/%s/children", (int)p, e->d_name);
            int fd = open(cpath, O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;
            char buf[8192];
            ssize_t len;
            char carry[16];
            size_t clen = 0;
            while ((len = read(fd, buf, sizeof buf)) > 0) {
                for (ssize_t i = 0; i < len; i++) {
                    char c = buf[i];
                    if (c >= '0' && c <= '9') {
                        if (clen < sizeof carry - 1) carry[clen++] = c;
                    } else if (clen) {
                        carry[clen] = 0;
                        if (n < max) out[n++] = (pid_t)atoi(carry);
                        clen = 0;
                    }
                }
            }
            if (clen && n < max) {
                carry[clen] = 0;
                out[n++] = (pid_t)atoi(carry);
            }
            close(fd);
        }
        closedir(d);
    }
    return n; /* out[0] is root itself */
}

static pid_t pids[MAX_PIDS], pgids[MAX_PIDS];

/* Signal every descendant; returns how many were signalled.  Reports them as
 * "s SIG pid..." lines (several when they do not fit one) when `report` is set or
 * anything was signalled. */
static int signal_tree(int sig, int report) {
    /* The tree as it is now (so what the signal is about to kill is still listed), then
     * the command's group at once (atomic against fork), then every descendant outside
     * it.  A group member is not signalled twice: a second SIGINT or SIGTERM would cut
     * short the handler of a child that is shutting down cleanly. */
    int n = collect(getpid(), pids, MAX_PIDS);
    for (int i = 1; i < n; i++) pgids[i] = getpgid(pids[i]);
    int group = cmd_pid > 0 && kill(-cmd_pid, sig) == 0;
    char line[2048];
    int off = snprintf(line, sizeof line, "s %d", sig);
    int count = 0, pending = 0;
    for (int i = 1; i < n; i++) {
        if (pgids[i] < 0) continue; /* gone before the signal */
        if (!(group && sig != SIGKILL && pgids[i] == cmd_pid) && kill(pids[i], sig) != 0)
            continue;
        count++;
        pending = 1;
        off += snprintf(line + off, sizeof line - off, " %d", (int)pids[i]);
        if (off > (int)sizeof line - 16) {
            say("%s\n", line);
            off = snprintf(line, sizeof line, "s %d", sig);
            pending = 0;
        }
    }
    if (pending || (report && count == 0)) say("%s\n", line);
    if (sig == SIGTERM) {
        /* A stopped process would sit on its SIGTERM until SIGKILL and be named as
         * ignoring it: continue it so its handler runs within grace (as systemd does). */
        if (group) kill(-cmd_pid, SIGCONT);
        for (int i = 1; i < n; i++)
            if (pgids[i] >= 0 && !(group && pgids[i] == cmd_pid)) kill(pids[i], SIGCONT);
    }
    return count;
}

/* A zombie's own CPU time (not its reaped children's), from /proc/PID/stat, in us. */
static long long own_cpu_us(pid_t p) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)p);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *q = strrchr(buf, ')');
    if (!q) return -1;
    unsigned long long ut = 0, st = 0;
    /* after ")": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime */
    if (sscanf(q + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    return (long long)(ut + st) * 1000000LL / sysconf(_SC_CLK_TCK);
}

static void reap(int *cmd_done) {
    for (;;) {
        siginfo_t info;
        memset(&info, 0, sizeof info);
        /* Peek first (WNOWAIT): the zombie's own CPU is readable until it is reaped. */
        if (waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) != 0 || info.si_pid == 0) return;
        pid_t p = info.si_pid;
        long long own = own_cpu_us(p);
        int st;
        struct rusage ru;
        if (wait4(p, &st, 0, &ru) != p) return;
        long long ut = (long long)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec;
        long long stt = (long long)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec;
        if (p == cmd_pid) {
            say("X %d %d %lld %lld %ld %lld\n", (int)p, st, ut, stt, ru.ru_maxrss, own);
            *cmd_done = 1;
        } else if (WIFSIGNALED(st)) {
            int sig = WTERMSIG(st);
            /* SIGKILL counts as the RLIMIT_CPU hard limit only from the process's own CPU. */
            if (sig == SIGXCPU || sig == SIGXFSZ ||
                (sig == SIGKILL && cpu_soft >= 0 && own >= cpu_soft * 1000000LL))
                say("R %d %d %lld\n", (int)p, st, own);
        }
    }
}

static long long self_cpu_us(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (long long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000LL +
           ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
}

static void fail_child(int errfd, const char *step) {
    char buf[64];
    int n = snprintf(buf, sizeof buf, "%s:%d", step, errno);
    if (write(errfd, buf, n) < 0) { /* nothing left to tell */ }
    _exit(127);
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = (ssize_t)strlen(text);
    int ok = write(fd, text, n) == n;
    close(fd);
    return ok ? 0 : -1;
}

/* A new user namespace that maps only our own uid and gid (uid/gid read before it). */
static int enter_userns(uid_t uid, gid_t gid) {
    if (unshare(CLONE_NEWUSER) != 0) return -1;
    char map[64];
    write_file("/proc/self/setgroups", "deny"); /* older kernels have no setgroups file */
    snprintf(map, sizeof map, "%u %u 1", (unsigned)uid, (unsigned)uid);
    if (write_file("/proc/self/uid_map", map) != 0) return -1;
    snprintf(map, sizeof map, "%u %u 1", (unsigned)gid, (unsigned)gid);
    if (write_file("/proc/self/gid_map", map) != 0) return -1;
    return 0;
}

/* Bring up the new network namespace's own loopback: local servers of the tree work,
 * nothing outside is reachable. */
static void loopback_up(void) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) return;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    close(s);
}

struct path_beneath {
    unsigned long long allowed_access;
    int parent_fd;
} __attribute__((packed));

struct net_port {
    unsigned long long allowed_access, port;
};

/* A seccomp filter: the tree cannot change the limits or the scheduling of another
 * process.  Same-uid processes may set each other's rlimits, nice value, policy, CPU
 * affinity and I/O priority, and Landlock does not govern any of it: the tree could give
 * supervise or this reaper RLIMIT_NOFILE 4 (the watcher goes blind), or make them
 * SCHED_IDLE at nice 19 pinned to a busy CPU (measured: a 1 s deadline enforced after
 * 5-12 s on a loaded machine).  What stays allowed: a process's own settings through pid
 * 0 (setrlimit, nice(1), taskset or chrt starting a command, sched_setaffinity(0)) and
 * reading anyone's.  What fails (EPERM): renice -p, taskset -p, chrt -p, prlimit --pid,
 * and pthread_setaffinity_np / pthread_setschedparam, which name a thread by its tid.
 * Returns 0 when the filter is in place. */
#if defined(__x86_64__) || defined(__aarch64__)
#define ARG_LO(i) (offsetof(struct seccomp_data, args) + 8 * (i))
#define ARG_HI(i) (offsetof(struct seccomp_data, args) + 8 * (i) + 4)
enum { TO_ALLOW = 1000, TO_DENY, TO_NEXT, TO_COMPAT }; /* symbolic jump targets */
struct bpf {
    struct sock_filter f[128];
    int jt[128], jf[128]; /* a relative offset, or a TO_ target */
    int n, block;         /* instructions so far; where the current block's NEXT points */
};
static void bpf_op(struct bpf *b, unsigned short code, unsigned k, int jt, int jf) {
    b->f[b->n] = (struct sock_filter)BPF_JUMP(code, k, 0, 0);
    b->jt[b->n] = jt;
    b->jf[b->n] = jf;
    b->n++;
}
#define LD(b, off) bpf_op(b, BPF_LD | BPF_W | BPF_ABS, (unsigned)(off), 0, 0)
#define JEQ(b, k, jt, jf) bpf_op(b, BPF_JMP | BPF_JEQ | BPF_K, (unsigned)(k), jt, jf)
/* Point the jumps to `label` from instructions [from, n) here. */
static void bpf_label(struct bpf *b, int from, int label) {
    for (int i = from; i < b->n; i++) {
        if (b->jt[i] == label) b->jt[i] = b->n - i - 1;
        if (b->jf[i] == label) b->jf[i] = b->n - i - 1;
    }
}
/* The block that ends here: its NEXT jumps come here; the next block begins. */
static void bpf_next(struct bpf *b) {
    bpf_label(b, b->block, TO_NEXT);
    b->block = b->n;
}
/* Syscall numbers of one table: prlimit64, then the calls that take a pid first, then
 * setpriority and ioprio_set (which, who). */
struct nrs { unsigned prlimit, pid_first[4], setpriority, ioprio_set; };
static void bpf_table(struct bpf *b, const struct nrs *t, unsigned mask) {
#define NR() do { LD(b, offsetof(struct seccomp_data, nr)); \
        if (mask) bpf_op(b, BPF_ALU | BPF_AND | BPF_K, mask, 0, 0); } while (0)
    NR();
    JEQ(b, t->prlimit, 0, TO_NEXT);
    LD(b, ARG_LO(0)); /* pid_t: the low word is all of it */
    JEQ(b, 0, TO_ALLOW, 0);
    LD(b, ARG_LO(2)); /* new_limit: NULL only reads */
    JEQ(b, 0, 0, TO_DENY);
    LD(b, ARG_HI(2));
    JEQ(b, 0, TO_ALLOW, TO_DENY);
    bpf_next(b);
    for (int k = 0; k < 4; k++) {
        NR();
        JEQ(b, t->pid_first[k], 0, TO_NEXT);
        LD(b, ARG_LO(0));
        JEQ(b, 0, TO_ALLOW, TO_DENY);
        bpf_next(b);
    }
    const unsigned who_user[2][2] = {{t->setpriority, 2 /* PRIO_USER */},
                                     {t->ioprio_set, 3 /* IOPRIO_WHO_USER */}};
    for (int k = 0; k < 2; k++) { /* who 0 is the caller (or its group); a user is not */
        NR();
        JEQ(b, who_user[k][0], 0, TO_NEXT);
        LD(b, ARG_LO(1));
        JEQ(b, 0, 0, TO_DENY);
        LD(b, ARG_LO(0));
        JEQ(b, who_user[k][1], TO_DENY, TO_ALLOW);
        bpf_next(b);
    }
    bpf_op(b, BPF_JMP | BPF_JA, 0, 0, 0); /* k patched to ALLOW below */
    b->jt[b->n - 1] = TO_ALLOW;
    bpf_next(b);
#undef NR
}
static int guard_other_processes(void) {
    static const struct nrs native = {
        SYS_prlimit64,
        {SYS_sched_setscheduler, SYS_sched_setparam, SYS_sched_setattr, SYS_sched_setaffinity},
        SYS_setpriority, SYS_ioprio_set};
    struct bpf b;
    memset(&b, 0, sizeof b);
    LD(&b, offsetof(struct seccomp_data, arch));
#if defined(__x86_64__)
    /* x32 numbers are the 64-bit ones with bit 30 set: masked off, one table serves both */
    JEQ(&b, AUDIT_ARCH_X86_64, 0, TO_COMPAT);
    b.block = b.n;
    bpf_table(&b, &native, ~0x40000000U);
    bpf_label(&b, 0, TO_COMPAT);
    /* int 0x80 from a 64-bit process reaches the i386 table */
    static const struct nrs i386 = {340, {156, 154, 351, 241}, 97, 289};
    LD(&b, offsetof(struct seccomp_data, arch));
    JEQ(&b, AUDIT_ARCH_I386, 0, TO_ALLOW);
    b.block = b.n;
    bpf_table(&b, &i386, 0);
#else
    JEQ(&b, AUDIT_ARCH_AARCH64, 0, TO_ALLOW);
    b.block = b.n;
    bpf_table(&b, &native, 0);
#endif
    int deny = b.n, allow = b.n + 1;
    bpf_op(&b, BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM, 0, 0);
    bpf_op(&b, BPF_RET | BPF_K, SECCOMP_RET_ALLOW, 0, 0);
    for (int i = 0; i < deny; i++) {
        int *jt = &b.jt[i], *jf = &b.jf[i];
        if (*jt == TO_ALLOW) *jt = allow - i - 1;
        if (*jt == TO_DENY) *jt = deny - i - 1;
        if (*jf == TO_ALLOW) *jf = allow - i - 1;
        if (*jf == TO_DENY) *jf = deny - i - 1;
        if (BPF_CLASS(b.f[i].code) == BPF_JMP && BPF_OP(b.f[i].code) == BPF_JA)
            b.f[i].k = (unsigned)*jt;
        else {
            b.f[i].jt = (unsigned char)*jt;
            b.f[i].jf = (unsigned char)*jf;
        }
    }
    struct sock_fprog prog = {(unsigned short)b.n, b.f};
    return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0);
}
#else
static int guard_other_processes(void) { errno = ENOSYS; return -1; }
#endif

/* A root tree keeps root, minus what would undo its limits: CAP_SYS_RESOURCE (raise its
 * own hard rlimits) and CAP_SYS_PTRACE (read the non-dumpable reaper through /proc).
 * Dropped from the bounding set too, so no exec gets them back.  Needs CAP_SETPCAP for
 * the bounding set; without privilege there is nothing to drop. */
static void drop_caps(void) {
    const int drop[] = {CAP_SYS_RESOURCE, CAP_SYS_PTRACE};
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    for (size_t k = 0; k < sizeof drop / sizeof drop[0]; k++)
        prctl(PR_CAPBSET_DROP, drop[k], 0, 0, 0);
    if (syscall(SYS_capget, &hdr, data) != 0) return;
    for (size_t k = 0; k < sizeof drop / sizeof drop[0]; k++) {
        unsigned bit = 1U << (drop[k] % 32);
        data[drop[k] / 32].effective &= ~bit;
        data[drop[k] / 32].permitted &= ~bit;
        data[drop[k] / 32].inheritable &= ~bit;
    }
    syscall(SYS_capset, &hdr, data);
}

/* Join the cgroups the supervisor made (DIR[:DIR]...: pids.max caps the tree's tasks,
 * threads included, where RLIMIT_NPROC cannot; memory, CPU accounting).  Best effort:
 * the supervisor checks /proc/PID/cgroup for the evidence.  Only the first write waits
 * for an RCU grace period; the others find it passed. */
static void join_cgroup(const char *dirs) {
    char path[4200], pid[32];
    snprintf(pid, sizeof pid, "%d\n", (int)getpid());
    for (const char *d = dirs; d && *d;) {
        const char *end = strchr(d, ':');
        size_t len = end ? (size_t)(end - d) : strlen(d);
        if (len < 4096) {
            snprintf(path, sizeof path, "%.*s/cgroup.procs", (int)len, d);
            write_file(path, pid);
        }
        d = end ? end + 1 : NULL;
    }
}

/* Remove the cgroups once the tree is empty (DIR[:DIR]...), if the supervisor is gone:
 * else it reads their last figures (CPU, OOM kills) first and removes them itself. */
static void remove_cgroups(const char *dirs, int parent_fd, pid_t ppid) {
    char path[4200];
    struct pollfd pfd = {parent_fd, POLLIN, 0};
    int gone = parent_fd >= 0 ? poll(&pfd, 1, 0) > 0 : getppid() != ppid;
    if (!gone) return;
    for (const char *d = dirs; d && *d;) {
        const char *end = strchr(d, ':');
        size_t len = end ? (size_t)(end - d) : strlen(d);
        if (len < 4096) {
            snprintf(path, sizeof path, "%.*s", (int)len, d);
            rmdir(path);
        }
        d = end ? end + 1 : NULL;
    }
}

/* -- identity: the tree's mount namespace, capabilities and user (issue 14) ----------
 *
 * mnt=1 gives the command a mount namespace of its own (through a user namespace mapping
 * its own ids when unprivileged; mnt=2: where the kernel allows it); in it, ro=1 makes every host mount read-only (EROFS then
 * stops chmod, chown, utime, xattrs and mknod, for root and users alike), rw=PATH mounts
 * stay writable and nodev (the workspace, the policy's writable paths), and mask=PATH is
 * covered: a directory by an empty read-only tmpfs, a file by /dev/null (supervise's
 * cache and state, a policy file holding a password).  nocaps=1 (a root tree) drops
 * every capability, bounding and ambient sets included, and locks the securebits so that
 * no exec of uid 0 gets one back.  user=UID:GID[:G,G...] runs the command as that user.
 * rmtmp=PATH (a temporary workspace) is removed by this reaper when the supervisor died
 * before removing it. */
#define MAX_MOUNTS 64
struct identity {
    int mnt, ro, nocaps, nrw, nmask, has_user;
    uid_t uid;
    gid_t gid;
    int ngroups;
    gid_t groups[64];
    const char *rw[MAX_MOUNTS], *mask[MAX_MOUNTS];
    const char *rmtmp;
};

#ifndef SYS_mount_setattr
#define SYS_mount_setattr 442
#endif
struct mount_attr_v0 { unsigned long long attr_set, attr_clr, propagation, userns_fd; };
#define ATTR_RDONLY 0x1ULL
#define ATTR_NOSUID 0x2ULL
#define ATTR_NODEV 0x4ULL
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif

static int parse_identity(const char *a, struct identity *id) {
    if (!strncmp(a, "mnt=", 4)) id->mnt = atoi(a + 4);
    else if (!strncmp(a, "ro=", 3)) id->ro = atoi(a + 3);
    else if (!strncmp(a, "nocaps=", 7)) id->nocaps = atoi(a + 7);
    else if (!strncmp(a, "rw=", 3) && id->nrw < MAX_MOUNTS) id->rw[id->nrw++] = a + 3;
    else if (!strncmp(a, "mask=", 5) && id->nmask < MAX_MOUNTS) id->mask[id->nmask++] = a + 5;
    else if (!strncmp(a, "rmtmp=", 6)) id->rmtmp = a + 6;
    else if (!strncmp(a, "user=", 5)) {
        unsigned u, g;
        int used = 0;
        if (sscanf(a + 5, "%u:%u%n", &u, &g, &used) != 2) return 0;
        id->uid = u;
        id->gid = g;
        id->has_user = 1;
        const char *q = a + 5 + used;
        while (*q == ':' || *q == ',') {
            q++;
            char *end;
            unsigned long v = strtoul(q, &end, 10);
            if (end == q) break;
            if (id->ngroups < 64) id->groups[id->ngroups++] = (gid_t)v;
            q = end;
        }
    } else return 0;
    return 1;
}

static int set_mount_attr(const char *path, unsigned long long set, unsigned long long clr) {
    struct mount_attr_v0 attr = {set, clr, 0, 0};
    return (int)syscall(SYS_mount_setattr, AT_FDCWD, path, AT_RECURSIVE, &attr, sizeof attr);
}

/* In the command, after enter_namespaces: the mount namespace described above.  A step
 * the kernel refuses fails the start (the supervisor asked for it because the policy
 * confines the tree); the supervisor reads back /proc/PID/mountinfo for run_start. */
static void enter_mount_jail(const struct identity *id, int errfd, uid_t uid, gid_t gid) {
    if (!id->mnt) return;
    if (unshare(CLONE_NEWNS) != 0) {
        if (errno != EPERM || enter_userns(uid, gid) != 0 || unshare(CLONE_NEWNS) != 0) {
            if (id->mnt == 2) return; /* best effort: run_start shows no namespace */
            fail_child(errfd, "mount_namespace");
        }
    }
    /* Nothing done here may reach the host's namespace. */
    if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) != 0) fail_child(errfd, "mount_private");
    for (int k = 0; k < id->nrw; k++) /* a mount of its own, to be made writable below */
        if (mount(id->rw[k], id->rw[k], NULL, MS_BIND | MS_REC, NULL) != 0)
            fail_child(errfd, "mount_bind");
    for (int k = 0; k < id->nmask; k++) {
        struct stat st;
        if (stat(id->mask[k], &st) != 0) continue; /* nothing there to hide */
        int r = S_ISDIR(st.st_mode)
            ? mount("tmpfs", id->mask[k], "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    "size=4k,mode=0555")
            : mount("/dev/null", id->mask[k], NULL, MS_BIND, NULL);
        if (r != 0) fail_child(errfd, "mount_mask");
    }
    if (id->ro) {
        if (set_mount_attr("/", ATTR_RDONLY | ATTR_NOSUID, 0) != 0) fail_child(errfd, "mount_readonly");
        for (int k = 0; k < id->nrw; k++)
            if (set_mount_attr(id->rw[k], ATTR_NODEV | ATTR_NOSUID, ATTR_RDONLY) != 0)
                fail_child(errfd, "mount_writable");
    }
}

/* In the command, after the namespaces and before Landlock: the user it runs as. */
static void switch_user(const struct identity *id, int errfd) {
    if (!id->has_user) return;
    if (setgroups((size_t)id->ngroups, id->groups) != 0) fail_child(errfd, "setgroups");
    if (setresgid(id->gid, id->gid, id->gid) != 0) fail_child(errfd, "setgid");
    if (setresuid(id->uid, id->uid, id->uid) != 0) fail_child(errfd, "setuid");
}

/* A root tree that is confined keeps no capability (see nocaps above). */
static void drop_all_caps(const struct identity *id, int errfd) {
    if (!id->nocaps || geteuid() != 0) return;
    /* Belt and braces (refused in some user namespaces): the empty bounding set alone
     * already keeps an exec of uid 0 from getting any capability back. */
    prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP |
          SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS_LOCKED |
          SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED, 0, 0, 0);
    /* Refused only where this root is itself a user namespace's (no host privilege to
     * keep); run_start reads the capabilities back either way. */
    for (int cap = 0; cap <= 63; cap++) prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &hdr, data) != 0) fail_child(errfd, "capset");
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st; (void)flag; (void)ftw;
    remove(path);
    return 0;
}

/* The supervisor died: its temporary workspace goes with the tree. */
static void remove_temporary(const struct identity *id) {
    if (id->rmtmp && strstr(id->rmtmp, "/supervise-"))
        nftw(id->rmtmp, remove_entry, 16, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
}

/* What the arguments ask for (see the top of this file). */
struct opts {
    pid_t ppid;
    long long cpu_hard, as, fsize, fsize_hard, nofile, nproc, oom;
    unsigned long long lfs, lnet, lnetfb;
    int scope, netns, ipcns, nrules, npass, gw_fd, gw_port;
    const char *rules[MAX_RULES];
    const char *cwd, *cgroup;
    int pass[MAX_PASS];
    char **cmd;
    struct identity id;
};

/* Step 1: the key=value words, then "--", then the command.  0, or 125 on a bad word. */
static int parse_args(int argc, char **argv, struct opts *o) {
    int i;
    memset(o, 0, sizeof *o);
    o->cpu_hard = o->as = o->fsize = o->fsize_hard = o->nofile = o->nproc = -1;
    o->oom = -1000000;
    o->gw_fd = -1;
    for (i = 1; i < argc && strcmp(argv[i], "--") != 0; i++) {
        char *a = argv[i];
        if (!strncmp(a, "fd=", 3)) status_fd = ctl_fd = atoi(a + 3);
        else if (!strncmp(a, "status=", 7)) status_fd = atoi(a + 7);
        else if (!strncmp(a, "ctl=", 4)) ctl_fd = atoi(a + 4);
        else if (!strncmp(a, "ppid=", 5)) o->ppid = (pid_t)atoi(a + 5);
        else if (!strncmp(a, "cpu=", 4)) sscanf(a + 4, "%lld:%lld", &cpu_soft, &o->cpu_hard);
        else if (!strncmp(a, "as=", 3)) o->as = atoll(a + 3);
        else if (!strncmp(a, "fsize=", 6)) {
            if (sscanf(a + 6, "%lld:%lld", &o->fsize, &o->fsize_hard) < 2) o->fsize_hard = o->fsize;
        }
        else if (!strncmp(a, "lfs=", 4)) o->lfs = strtoull(a + 4, NULL, 0);
        else if (!strncmp(a, "lnet=", 5)) o->lnet = strtoull(a + 5, NULL, 0);
        else if (!strncmp(a, "lnetfb=", 7)) o->lnetfb = strtoull(a + 7, NULL, 0);
        else if (!strncmp(a, "rule=", 5) && o->nrules < MAX_RULES && strchr(a, ':'))
            o->rules[o->nrules++] = a + 5;
        else if (!strncmp(a, "netns=", 6)) o->netns = atoi(a + 6);
        else if (!strncmp(a, "gw=", 3)) {
            if (sscanf(a + 3, "%d:%d", &o->gw_fd, &o->gw_port) != 2 || o->gw_port <= 0 ||
                o->gw_port > 65535) {
                fprintf(stderr, "supervise reaper: bad argument %s (gw=FD:PORT)\n", a);
                return 125;
            }
        }
        else if (!strncmp(a, "ipcns=", 6)) o->ipcns = atoi(a + 6);
        else if (!strncmp(a, "cgroup=", 7)) o->cgroup = a + 7;
        else if (!strncmp(a, "nofile=", 7)) o->nofile = atoll(a + 7);
        else if (!strncmp(a, "oom=", 4)) o->oom = atoll(a + 4);
        else if (!strncmp(a, "nproc=", 6)) o->nproc = atoll(a + 6);
        else if (!strncmp(a, "scope=", 6)) o->scope = atoi(a + 6);
        else if (!strncmp(a, "cwd=", 4)) o->cwd = a + 4;
        else if (!strncmp(a, "pass=", 5) && o->npass < MAX_PASS) o->pass[o->npass++] = atoi(a + 5);
        else if (parse_identity(a, &o->id)) {}
        else {
            fprintf(stderr, "supervise reaper: unknown argument %s\n", a);
            return 125;
        }
    }
    if (i >= argc - 1 || status_fd < 0 || ctl_fd < 0 || o->ppid <= 0) {
        fprintf(stderr, "supervise reaper: usage: fd=FD ppid=PID ... -- command\n");
        return 125;
    }
    o->cmd = argv + i + 1;
    return 0;
}

/* Step 2: nothing of the parent's leaks to the command: every fd >= 3 closes on exec,
 * but the pass= fds. */
static void close_inherited_fds(const struct opts *o) {
    if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC) != 0) {
        DIR *d = opendir("/proc/self/fd");
        struct dirent *e;
        while (d && (e = readdir(d)) != NULL) {
            int fd = atoi(e->d_name);
            if (fd >= 3) fcntl(fd, F_SETFD, FD_CLOEXEC);
        }
        if (d) closedir(d);
    }
    for (int k = 0; k < o->npass; k++) fcntl(o->pass[k], F_SETFD, 0);
}

/* Step 3: become the tree's reaper: a subreaper and session leader that cannot be
 * ptraced, watching the supervisor through a pidfd.  Returns the pidfd (-1: none), or
 * -2 when the supervisor died before we started. */
static int become_reaper(struct opts *o) {
    if (o->scope) { /* signal scoping needs Landlock ABI >= 6; below that the tree is unscoped */
        long abi = syscall(SYS_landlock_create_ruleset, NULL, 0, 1UL /* VERSION */);
        if (abi < 6) o->scope = 0;
    }
    signal(SIGPIPE, SIG_IGN);
    /* An embedding program that ignores SIGCHLD passes SIG_IGN on: the kernel would then
     * reap the command behind our back. */
    signal(SIGCHLD, SIG_DFL);
    /* Not dumpable: the tree (same uid) cannot ptrace us or open our /proc/PID/fd. */
    prctl(PR_SET_DUMPABLE, 0);
    int parent_fd = (int)syscall(SYS_pidfd_open, o->ppid, 0);
    if (getppid() != o->ppid) return -2; /* the supervisor died before we started */
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    setsid();
    return parent_fd;
}

/* In the command: the rlimits (and a raised oom_score_adj). */
static void apply_rlimits(const struct opts *o, int errfd) {
    if (o->oom > -1000000) {
        int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            char b[32];
            int n = snprintf(b, sizeof b, "%lld", o->oom);
            if (write(fd, b, n) < 0) { /* raising needs no privilege; /proc may be absent */ }
            close(fd);
        }
    }
    struct rlimit rl;
    if (cpu_soft >= 0) {
        rl.rlim_cur = cpu_soft;
        rl.rlim_max = o->cpu_hard;
        if (setrlimit(RLIMIT_CPU, &rl) != 0) fail_child(errfd, "rlimit_cpu");
    }
    if (o->as >= 0) {
        rl.rlim_cur = rl.rlim_max = o->as;
        if (setrlimit(RLIMIT_AS, &rl) != 0) fail_child(errfd, "rlimit_as");
    }
    if (o->fsize >= 0) {
        rl.rlim_cur = o->fsize;
        rl.rlim_max = o->fsize_hard;
        if (setrlimit(RLIMIT_FSIZE, &rl) != 0) fail_child(errfd, "rlimit_fsize");
    }
    if (o->nofile >= 0) {
        rl.rlim_cur = rl.rlim_max = o->nofile;
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0) fail_child(errfd, "rlimit_nofile");
    }
}

/* In the command: the user namespace (RLIMIT_NPROC counted per namespace), the network
 * and IPC namespaces.  Sets *lnet to the Landlock TCP fallback when netns=2 needs it.
 * Returns 1 when the command has a network namespace of its own. */
static int enter_namespaces(const struct opts *o, int errfd, unsigned long long *lnet) {
    struct rlimit rl;
    /* Where user namespaces are refused (sysctl, LSM), the watcher alone counts
     * processes; the supervisor sees which from /proc/PID/ns/user. */
    uid_t uid = getuid(); /* before unshare: inside, unmapped ids read as 65534 */
    gid_t gid = getgid();
    int in_userns = 0;
    if (o->nproc >= 0 && unshare(CLONE_NEWUSER) == 0) {
        /* unshare succeeded; now map the ids (a failure here is fatal: unmapped ids) */
        char map[64];
        write_file("/proc/self/setgroups", "deny");
        snprintf(map, sizeof map, "%u %u 1", (unsigned)uid, (unsigned)uid);
        if (write_file("/proc/self/uid_map", map) != 0) fail_child(errfd, "uid_map");
        snprintf(map, sizeof map, "%u %u 1", (unsigned)gid, (unsigned)gid);
        if (write_file("/proc/self/gid_map", map) != 0) fail_child(errfd, "gid_map");
        in_userns = 1;
        rl.rlim_cur = rl.rlim_max = o->nproc;
        if (setrlimit(RLIMIT_NPROC, &rl) != 0) fail_child(errfd, "rlimit_nproc");
    }
    int own_net = 0;
    if (o->netns) {
        own_net = unshare(CLONE_NEWNET) == 0;
        if (!own_net && !in_userns && enter_userns(uid, gid) == 0)
            own_net = unshare(CLONE_NEWNET) == 0;
        if (own_net) loopback_up();
        else if (o->netns == 2 && o->lnetfb) *lnet = o->lnetfb;
        else fail_child(errfd, "netns");
    }
    /* SysV shared memory, semaphores and POSIX message queues of the tree's own: they
     * go with its last process instead of outliving the run.  Needs privilege (root,
     * or a user namespace entered above); without it the tree shares the host's. */
    if (o->ipcns) unshare(CLONE_NEWIPC);
    return own_net;
}

/* In the command, after enter_namespaces and before Landlock: the gateway's listening
 * socket on 127.0.0.1:PORT, made in the namespace the tree lives in and sent to the
 * supervisor (see gw= at the top).  Returns the port the Landlock domain must let the
 * tree connect to: PORT under the TCP fallback, else 0.  In a namespace of its own the
 * port is free (the namespace is new); in the host's it may be taken: then the tree is
 * given no port, and the supervisor, receiving nothing, says so. */
static int make_gateway_socket(const struct opts *o, int errfd, int own_net,
                               unsigned long long lnet) {
    if (o->gw_fd < 0 || !o->netns || (!own_net && !lnet)) return 0;
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) fail_child(errfd, "gateway_socket");
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)o->gw_port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(s, (struct sockaddr *)&addr, sizeof addr) != 0) {
        if (own_net) fail_child(errfd, "gateway_bind");
        close(s); /* the host's port is taken: no way to the gateway, and no port opened */
        close(o->gw_fd);
        return 0;
    }
    if (listen(s, 1024) != 0) fail_child(errfd, "gateway_listen");
    char cbuf[CMSG_SPACE(sizeof(int))];
    memset(cbuf, 0, sizeof cbuf);
    char byte = 'g';
    struct iovec iov = {&byte, 1};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf;
    msg.msg_controllen = sizeof cbuf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &s, sizeof(int));
    ssize_t sent;
    do sent = sendmsg(o->gw_fd, &msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent != 1) fail_child(errfd, "gateway_send");
    close(s); /* the supervisor holds it now; the tree keeps none */
    close(o->gw_fd);
    return own_net ? 0 : o->gw_port;
}

/* In the command: the Landlock domain (the workspace jail, TCP rules, signal scope). */
static void apply_landlock(const struct opts *o, int errfd, unsigned long long lnet, int port) {
    unsigned long long lfs = o->lfs;
    int scope = o->scope;
    if (!(scope || lfs || lnet)) return;
    struct { unsigned long long fs, net, scoped; } attr = {
        lfs, lnet, scope ? LANDLOCK_SCOPE_SIGNAL_BIT : 0};
    /* An older ABI reads a shorter struct: the unused tail must not be passed. */
    size_t size = scope ? sizeof attr : lnet ? 2 * sizeof(unsigned long long)
                                             : sizeof(unsigned long long);
    int rfd = (int)syscall(SYS_landlock_create_ruleset, &attr, size, 0);
    if (rfd < 0) fail_child(errfd, "landlock");
    for (int r = 0; r < o->nrules; r++) {
        const char *colon = strchr(o->rules[r], ':');
        struct path_beneath pb;
        pb.allowed_access = strtoull(o->rules[r], NULL, 0);
        pb.parent_fd = open(colon + 1, O_PATH | O_CLOEXEC);
        if (pb.parent_fd < 0) fail_child(errfd, "landlock_path");
        if (syscall(SYS_landlock_add_rule, rfd, LANDLOCK_RULE_PATH_BENEATH, &pb, 0) != 0)
            fail_child(errfd, "landlock_rule");
        close(pb.parent_fd);
    }
    if (port > 0 && (lnet & LANDLOCK_ACCESS_NET_CONNECT_TCP)) {
        /* The gateway's port, the only one the tree may connect to (TCP fallback). */
        struct net_port np = {LANDLOCK_ACCESS_NET_CONNECT_TCP, (unsigned long long)port};
        if (syscall(SYS_landlock_add_rule, rfd, LANDLOCK_RULE_NET_PORT, &np, 0) != 0)
            fail_child(errfd, "landlock_port");
    }
    /* The command's own stdin/stdout/stderr stay reopenable (echo >/dev/stderr)
     * when they are files or terminals: they are where the user sent its output. */
    for (int fd = 0; lfs && fd < 3; fd++) {
        struct stat st;
        if (fstat(fd, &st) != 0 || !(S_ISREG(st.st_mode) || S_ISCHR(st.st_mode))) continue;
        char self[32];
        snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
        struct path_beneath pb;
        /* write_file | read_file | truncate, as far as they are handled; stdin is read
         * only: `supervise ... < input.txt` must not let the tree rewrite input.txt. */
        pb.allowed_access = lfs & (fd == 0 ? (1ULL << 2) : (1ULL << 1) | (1ULL << 2) | (1ULL << 14));
        pb.parent_fd = open(self, O_PATH | O_CLOEXEC);
        if (pb.parent_fd < 0 || !pb.allowed_access) continue;
        syscall(SYS_landlock_add_rule, rfd, LANDLOCK_RULE_PATH_BENEATH, &pb, 0);
        close(pb.parent_fd);
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) fail_child(errfd, "no_new_privs");
    if (syscall(SYS_landlock_restrict_self, rfd, 0) != 0) fail_child(errfd, "landlock");
    close(rfd);
}

/* Step 4, in the forked child: set the command up and exec it; never returns. */
static void exec_command(const struct opts *o, int errfd, pid_t reaper) {
    /* The reaper is not dumpable; its child must be, or /proc/self/{uid_map,
     * oom_score_adj} turn root-owned and cannot be written (exec would reset it). */
    prctl(PR_SET_DUMPABLE, 1);
    if (setsid() < 0) fail_child(errfd, "setsid");
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) fail_child(errfd, "pdeathsig");
    if (getppid() != reaper) _exit(125);
    if (o->cgroup) join_cgroup(o->cgroup);
    apply_rlimits(o, errfd);
    uid_t uid = getuid(); /* before any user namespace: inside, unmapped ids read as 65534 */
    gid_t gid = getgid();
    unsigned long long lnet = o->lnet;
    int own_net = enter_namespaces(o, errfd, &lnet);
    enter_mount_jail(&o->id, errfd, uid, gid);
    int port = make_gateway_socket(o, errfd, own_net, lnet);
    drop_caps();
    switch_user(&o->id, errfd);
    drop_all_caps(&o->id, errfd);
    apply_landlock(o, errfd, lnet, port);
    /* The filter needs no_new_privs; the Landlock domain above has set it already. */
    if (!prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)) prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    if (guard_other_processes() != 0 && errno != ENOSYS && errno != EINVAL)
        fail_child(errfd, "seccomp");
    if (o->cwd && chdir(o->cwd) != 0) fail_child(errfd, "chdir");
    sigset_t none;
    sigemptyset(&none);
    for (int s = 1; s < 32; s++)
        if (s != SIGKILL && s != SIGSTOP) signal(s, SIG_DFL);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execvp(o->cmd[0], o->cmd);
    fail_child(errfd, "exec");
}

/* Step 5: "P pid pidfd scoped" once the command was exec'ed, or "E step errno". */
static void report_start(int errfd, int parent_fd, int scope) {
    char ebuf[64];
    ssize_t elen;
    do elen = read(errfd, ebuf, sizeof ebuf - 1);
    while (elen < 0 && errno == EINTR);
    close(errfd);
    if (elen > 0) {
        ebuf[elen] = 0;
        char *colon = strchr(ebuf, ':');
        if (colon) *colon = ' ';
        say("E %s\n", ebuf);
    } else {
        say("P %d %d %d\n", (int)cmd_pid, parent_fd >= 0, scope);
    }
}

/* Step 6: reap the tree and obey "s SIG" until it is empty; kill it all if the
 * supervisor goes. */
static int watch_tree(int sfd, int parent_fd) {
    int cmd_done = 0, orphaned = 0, killing = 0;
    char cbuf[256];
    size_t clen = 0;
    for (;;) {
        reap(&cmd_done);
        if (cmd_done) {
            /* Exit once no descendant is left: wait() says ECHILD. */
            if (waitid(P_ALL, 0, NULL, WEXITED | WNOHANG | WNOWAIT) < 0 && errno == ECHILD) break;
        }
        struct pollfd fds[3];
        memset(fds, 0, sizeof fds);
        int nf = 0;
        fds[nf].fd = sfd; fds[nf++].events = POLLIN;
        if (!orphaned) { fds[nf].fd = ctl_fd; fds[nf++].events = POLLIN; }
        if (!orphaned && parent_fd >= 0) { fds[nf].fd = parent_fd; fds[nf++].events = POLLIN; }
        int r = poll(fds, nf, (orphaned || killing) ? 10 : -1);
        if (r < 0 && errno != EINTR) orphaned = 1; /* cannot wait on anything: kill it all */
        if (fds[0].revents) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) == sizeof si) {}
        }
        int gone = 0;
        if (!orphaned && nf > 2 && fds[2].revents) gone = 1;
        if (!orphaned && fds[1].revents) {
            ssize_t len = read(ctl_fd, cbuf + clen, sizeof cbuf - 1 - clen);
            if (len <= 0) gone = 1;
            else {
                clen += len;
                char *nl;
                while ((nl = memchr(cbuf, '\n', clen)) != NULL) {
                    *nl = 0;
                    int sig;
                    if (sscanf(cbuf, "s %d", &sig) == 1 && sig > 0 && sig < 65) {
                        signal_tree(sig, 1);
                        if (sig == SIGKILL) killing = 1;
                    }
                    size_t used = (size_t)(nl - cbuf) + 1;
                    memmove(cbuf, nl + 1, clen - used);
                    clen -= used;
                }
                if (clen >= sizeof cbuf - 1) clen = 0; /* garbage: drop it */
            }
        }
        if (gone) orphaned = 1;
        /* SIGKILL is repeated until the tree is empty: a process forked between two
         * passes is caught by the next. Orphaned: the supervisor is gone, and nothing
         * may outlive it. */
        if (orphaned || killing) signal_tree(SIGKILL, 0);
    }
    return orphaned;
}

int main(int argc, char **argv) {
    static struct opts o;
    int rc = parse_args(argc, argv, &o);
    if (rc) return rc;
    close_inherited_fds(&o);
    int parent_fd = become_reaper(&o);
    if (parent_fd == -2) return 125;

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);

    int errpipe[2];
    if (pipe2(errpipe, O_CLOEXEC) != 0) {
        say("E pipe %d\n", errno);
        return 125;
    }
    pid_t me = getpid();
    cmd_pid = fork();
    if (cmd_pid < 0) {
        say("E fork %d\n", errno);
        return 125;
    }
    if (cmd_pid == 0) {
        close(errpipe[0]);
        exec_command(&o, errpipe[1], me);
    }
    close(errpipe[1]);
    if (o.gw_fd >= 0) close(o.gw_fd); /* the command's to send on: EOF once it is done */
    report_start(errpipe[0], parent_fd, o.scope);
    if (watch_tree(sfd, parent_fd)) remove_temporary(&o.id);
    /* The tree is empty: its cgroups go too when the supervisor is gone (else it reads
     * them first, and removes them). */
    if (o.cgroup) remove_cgroups(o.cgroup, parent_fd, o.ppid);
    say("D %lld\n", self_cpu_us());
    return 0;
}
