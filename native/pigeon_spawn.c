/*
 * NAME        native/pigeon_spawn.c — start a handed-off backend with vfork(2) instead of fork(2)
 * SYNOPSIS    const n = require('build/Release/pigeon_spawn.node')
 *             n.spawn(paths, argv, env, cwd, uid, gid, fd) → pid     (throws Error with .code = errno name)
 *             n.reap() → [pid, code, signal, pid, code, signal, …]   (every exited child, WNOHANG)
 *             n.dup(fd) → fd (close-on-exec)   n.lastWords(fd, bytes)   n.close(fd)
 *             n.socketPair(sndbuf) → [fd, fd]   (a connected AF_UNIX stream pair, close-on-exec,
 *             each end's SO_SNDBUF set to sndbuf when > 0: the worker's pair for a session relayed
 *             to a local backend, src/peer/pair.ts)   n.sendBufferSize(fd) → SO_SNDBUF as the kernel keeps it
 *             n.connectUnix(path) → fd   (a blocking, close-on-exec AF_UNIX stream connected to
 *             path: `pigeon deliver`'s hand-off to serve without node:net, src/delivery/handoff-client.ts)
 *             n.exclusiveAccept(fd) → true | false   (this process's wait on listening socket fd
 *             becomes EPOLLEXCLUSIVE: serve's workers, src/exclusive-accept.ts; false: not
 *             registered by libuv yet)
 * DESCRIPTION The spawner process (src/proxy/spawner-main.ts) starts one backend per login. Node 20's
 *             libuv starts children with fork(2): the kernel copies the page tables of the whole
 *             Node process (tens of MB) for a child that exec()s at once (0.6-1.1 ms per login here),
 *             and Node keeps a ChildProcess object per child (≈ 5 kB PSS each). This does what
 *             glibc's posix_spawn does: vfork (the child borrows the parent's memory until it
 *             exec()s; the parent thread waits), with every signal blocked in the parent around it
 *             and every handler reset to SIG_DFL in the child before the mask is cleared, so that
 *             no handler of the parent ever runs on the borrowed memory. posix_spawn itself cannot
 *             be used: it cannot change the uid/gid.
 *             The child does what libuv's child does for `spawn(file, args, { stdio: [fd, fd, 2],
 *             cwd, uid, gid, env })`: fd as stdin and stdout (blocking), stderr inherited, chdir,
 *             setgroups(0)/setgid/setuid, signal dispositions to default, empty signal mask, execve
 *             of each candidate path in turn (ENOENT/ENOTDIR/EACCES: the next one, as execvp).
 *             The child uses raw system calls only: glibc's setuid() would signal the parent's
 *             threads (its set-xid broadcast walks the thread list, which the child shares).
 *             An exec error reaches the parent through the shared memory (the child writes its
 *             errno, then _exit(127)s; the parent reaps it and throws).
 *             reap(): waitpid(-1, WNOHANG) until none is left: the spawner starts children only
 *             through this module, so every child is one of ours.
 * SECURITY    Everything the child gets is given by the caller (argv, env, uid/gid); nothing is read
 *             from the environment of this process. Descriptors: only stdio is inherited (every
 *             descriptor Node and this module open is close-on-exec).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <node_api.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#define CHECK(env, call)                                                   \
  do {                                                                     \
    if ((call) != napi_ok) {                                               \
      napi_throw_error((env), "EINVAL", "pigeon_spawn: bad arguments");    \
      return NULL;                                                         \
    }                                                                      \
  } while (0)

static napi_value throw_errno(napi_env env, int err, const char *what) {
  char msg[256];
  const char *name = strerrorname_np(err);
  snprintf(msg, sizeof msg, "%s %s: %s", what, name ? name : "E?", strerror(err));
  napi_throw_error(env, name ? name : "EUNKNOWN", msg);
  return NULL;
}

/* a JS string as a malloc'd NUL-terminated UTF-8 string (NUL bytes inside are refused) */
static char *get_string(napi_env env, napi_value v) {
  size_t len = 0;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) return NULL;
  char *s = malloc(len + 1);
  if (!s) return NULL;
  if (napi_get_value_string_utf8(env, v, s, len + 1, &len) != napi_ok || strlen(s) != len) {
    free(s);
    return NULL;
  }
  return s;
}

static void free_strings(char **v) {
  if (!v) return;
  for (char **p = v; *p; p++) free(*p);
  free(v);
}

/* a JS array of strings as a NULL-terminated char*[] */
static char **get_strings(napi_env env, napi_value arr) {
  uint32_t n = 0;
  bool is_array = false;
  if (napi_is_array(env, arr, &is_array) != napi_ok || !is_array) return NULL;
  if (napi_get_array_length(env, arr, &n) != napi_ok) return NULL;
  char **v = calloc((size_t)n + 1, sizeof *v);
  if (!v) return NULL;
  for (uint32_t i = 0; i < n; i++) {
    napi_value e;
    if (napi_get_element(env, arr, i, &e) != napi_ok || !(v[i] = get_string(env, e))) {
      free_strings(v);
      return NULL;
    }
  }
  return v;
}

static int get_int(napi_env env, napi_value v, int32_t *out) {
  return napi_get_value_int32(env, v, out) == napi_ok;
}

/* the child, on the parent's memory until execve: raw system calls only, nothing allocated */
static void child(char **paths, char **argv, char **envp, const char *cwd, int32_t uid, int32_t gid, int fd,
                  volatile int *err) {
  /* the kernel's struct sigaction (handler, flags, [restorer,] mask): all zero is SIG_DFL, no
     flags, nothing masked, whatever the architecture's layout */
  unsigned long dfl[4] = {0, 0, 0, 0};
  for (int n = 1; n < 32; n++) {
    if (n == SIGKILL || n == SIGSTOP) continue;
    /* every disposition back to default, SIG_IGN too (Node ignores SIGPIPE), as libuv does */
    if (syscall(SYS_rt_sigaction, n, dfl, NULL, 8) != 0) goto fail;
  }
  if (syscall(SYS_dup3, fd, 0, 0) < 0 || syscall(SYS_dup3, fd, 1, 0) < 0) goto fail;
  /* stderr inherited as it is (libuv clears its close-on-exec flag too: Node may have set it) */
  if (syscall(SYS_fcntl, 2, F_SETFD, 0) < 0 && errno != EBADF) goto fail;
  /* stdio blocking, as libuv leaves it (the descriptor is shared with the parent's copy) */
  {
    long fl = syscall(SYS_fcntl, 0, F_GETFL);
    if (fl < 0 || syscall(SYS_fcntl, 0, F_SETFL, fl & ~O_NONBLOCK) < 0) goto fail;
  }
  if (cwd[0] != '\0' && syscall(SYS_chdir, cwd) != 0) goto fail;
  if (uid >= 0 || gid >= 0) (void)syscall(SYS_setgroups, 0, NULL); /* optimistic, as libuv */
  if (gid >= 0 && syscall(SYS_setgid, gid) != 0) goto fail;
  if (uid >= 0 && syscall(SYS_setuid, uid) != 0) goto fail;
  {
    unsigned long none = 0; /* the kernel's sigset: 64 bits */
    if (syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, 8) != 0) goto fail;
  }
  {
    int last = ENOENT;
    for (char **p = paths; *p; p++) {
      syscall(SYS_execve, *p, argv, envp);
      last = errno;
      if (last != ENOENT && last != ENOTDIR && last != EACCES) break;
    }
    *err = last;
    syscall(SYS_exit, 127);
  }
fail:
  *err = errno ? errno : EINVAL;
  syscall(SYS_exit, 127);
}

static napi_value Spawn(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value a[7];
  CHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  if (argc != 7) {
    napi_throw_error(env, "EINVAL", "pigeon_spawn.spawn: 7 arguments");
    return NULL;
  }
  int32_t uid, gid, fd;
  if (!get_int(env, a[4], &uid) || !get_int(env, a[5], &gid) || !get_int(env, a[6], &fd) || fd < 3) {
    napi_throw_error(env, "EINVAL", "pigeon_spawn.spawn: uid, gid (-1: unchanged) and a descriptor > 2");
    return NULL;
  }
  char **paths = get_strings(env, a[0]);
  char **argv = get_strings(env, a[1]);
  char **envp = get_strings(env, a[2]);
  char *cwd = get_string(env, a[3]);
  if (!paths || !paths[0] || !argv || !argv[0] || !envp || !cwd) {
    free_strings(paths);
    free_strings(argv);
    free_strings(envp);
    free(cwd);
    napi_throw_error(env, "EINVAL", "pigeon_spawn.spawn: paths, argv (not empty), env (K=V) and cwd, without NUL bytes");
    return NULL;
  }
  volatile int err = 0;
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pid_t pid = vfork();
  if (pid == 0) child(paths, argv, envp, cwd, uid, gid, fd, &err); /* never returns */
  int vfork_errno = errno;
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  free_strings(paths);
  free_strings(argv);
  free_strings(envp);
  free(cwd);
  if (pid < 0) return throw_errno(env, vfork_errno, "spawn");
  if (err != 0) {
    /* the child has exited (vfork returned): reap it, it was never started */
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    return throw_errno(env, err, "spawn");
  }
  napi_value r;
  CHECK(env, napi_create_int32(env, pid, &r));
  return r;
}

static napi_value Reap(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value out;
  CHECK(env, napi_create_array(env, &out));
  uint32_t i = 0;
  for (;;) {
    int st;
    pid_t pid = waitpid(-1, &st, WNOHANG);
    if (pid < 0 && errno == EINTR) continue;
    if (pid <= 0) break;
    napi_value p, c, s;
    CHECK(env, napi_create_int32(env, pid, &p));
    CHECK(env, napi_create_int32(env, WIFEXITED(st) ? WEXITSTATUS(st) : -1, &c));
    CHECK(env, napi_create_int32(env, WIFSIGNALED(st) ? WTERMSIG(st) : 0, &s));
    CHECK(env, napi_set_element(env, out, i++, p));
    CHECK(env, napi_set_element(env, out, i++, c));
    CHECK(env, napi_set_element(env, out, i++, s));
  }
  return out;
}

/* the one argument of dup() and close(): a descriptor; 0 (an exception pending) when it is not */
static int fd_arg(napi_env env, napi_callback_info info, const char *what, int32_t *fd) {
  size_t argc = 1;
  napi_value a[1];
  if (napi_get_cb_info(env, info, &argc, a, NULL, NULL) != napi_ok || argc != 1 || !get_int(env, a[0], fd)) {
    char msg[64];
    snprintf(msg, sizeof msg, "pigeon_spawn.%s: a descriptor", what);
    napi_throw_error(env, "EINVAL", msg);
    return 0;
  }
  return 1;
}

static napi_value Dup(napi_env env, napi_callback_info info) {
  int32_t fd;
  if (!fd_arg(env, info, "dup", &fd)) return NULL;
  int d = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (d < 0) return throw_errno(env, errno, "dup");
  napi_value r;
  CHECK(env, napi_create_int32(env, d, &r));
  return r;
}

/* the last words of a backend that said nothing: one send (never blocks, no SIGPIPE), then the end */
static napi_value LastWords(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value a[2];
  int32_t fd;
  void *data = NULL;
  size_t len = 0;
  CHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  if (argc != 2 || !get_int(env, a[0], &fd) || napi_get_buffer_info(env, a[1], &data, &len) != napi_ok) {
    napi_throw_error(env, "EINVAL", "pigeon_spawn.lastWords: a descriptor and a Buffer");
    return NULL;
  }
  ssize_t n;
  do n = send(fd, data, len, MSG_DONTWAIT | MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  shutdown(fd, SHUT_WR);
  close(fd);
  return NULL;
}

static napi_value Close(napi_env env, napi_callback_info info) {
  int32_t fd;
  if (fd_arg(env, info, "close", &fd)) close(fd);
  return NULL;
}

/*
 * socketpair(2), which Node lacks: both ends close-on-exec (the spawner gives one to the backend).
 * sndbuf > 0: each end's SO_SNDBUF (Linux doubles it, within net.core.wmem_max; a failure leaves
 * the default, which only costs speed).
 */
static napi_value SocketPair(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value arg[1];
  int32_t sndbuf = 0;
  if (napi_get_cb_info(env, info, &argc, arg, NULL, NULL) != napi_ok || (argc >= 1 && !get_int(env, arg[0], &sndbuf))) {
    napi_throw_error(env, "EINVAL", "pigeon_spawn.socketPair: a send buffer size (0: the default)");
    return NULL;
  }
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) return throw_errno(env, errno, "socketpair");
  if (sndbuf > 0) {
    (void)setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    (void)setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  }
  napi_value r, a, b;
  if (napi_create_array_with_length(env, 2, &r) != napi_ok || napi_create_int32(env, sv[0], &a) != napi_ok ||
      napi_create_int32(env, sv[1], &b) != napi_ok || napi_set_element(env, r, 0, a) != napi_ok || napi_set_element(env, r, 1, b) != napi_ok) {
    close(sv[0]);
    close(sv[1]);
    napi_throw_error(env, "EINVAL", "pigeon_spawn.socketPair: cannot make the result");
    return NULL;
  }
  return r;
}

/* getsockopt(SO_SNDBUF): what the kernel made of a socketPair(sndbuf) (tests, diagnostics) */
static napi_value SendBufferSize(napi_env env, napi_callback_info info) {
  int32_t fd;
  if (!fd_arg(env, info, "sendBufferSize", &fd)) return NULL;
  int v = 0;
  socklen_t l = sizeof v;
  if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, &l) < 0) return throw_errno(env, errno, "getsockopt");
  napi_value r;
  CHECK(env, napi_create_int32(env, v, &r));
  return r;
}

/*
 * connect(2) to an AF_UNIX stream socket, blocking and close-on-exec: the `pigeon` command's
 * hand-off (src/launcher.ts → src/delivery/handoff-client.ts) then talks to serve with plain
 * read(2)/write(2) (fs.readSync/writeSync) instead of loading node:net (≈ 3-4 ms of a deliver's
 * 25-30 ms start). EINTR is retried; any other error is thrown with its errno name.
 */
static napi_value ConnectUnix(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value a[1];
  CHECK(env, napi_get_cb_info(env, info, &argc, a, NULL, NULL));
  char *path = argc == 1 ? get_string(env, a[0]) : NULL;
  if (!path) {
    napi_throw_error(env, "EINVAL", "pigeon_spawn.connectUnix: a path");
    return NULL;
  }
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  size_t len = strlen(path);
  if (len == 0 || len >= sizeof sa.sun_path) {
    free(path);
    return throw_errno(env, ENAMETOOLONG, "connect");
  }
  memcpy(sa.sun_path, path, len);
  free(path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return throw_errno(env, errno, "socket");
  int r;
  do r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    int err = errno;
    close(fd);
    return throw_errno(env, err, "connect");
  }
  napi_value out;
  if (napi_create_int32(env, fd, &out) != napi_ok) {
    close(fd);
    napi_throw_error(env, "EINVAL", "pigeon_spawn.connectUnix: cannot make the result");
    return NULL;
  }
  return out;
}

/*
 * Make this process's wait on a listening socket exclusive (EPOLLEXCLUSIVE, Linux >= 4.5): a new
 * connection then wakes one of the processes that share the socket (serve's workers, which all
 * wait on the same listening socket through node:cluster), the first one idle in epoll_wait,
 * instead of all of them, the losers finding nothing to accept. nginx does the same
 * (`accept_mutex off` with EPOLLEXCLUSIVE). libuv registered the socket in its epoll set as
 * { EPOLLIN, data.fd = fd } and changes that registration only when the watcher's event mask
 * changes, which a listening socket's never does while it listens: the registration is removed
 * and added again, the same with EPOLLEXCLUSIVE (which the kernel does not allow to change
 * afterwards: libuv's later EPOLL_CTL_DEL on close is allowed). Returns true when done, false
 * when libuv has not registered the socket yet (ENOENT: call again after the loop's next poll);
 * a kernel without EPOLLEXCLUSIVE (EINVAL) gets the registration back as it was, and throws; if
 * even that fails the error's message starts with ELOST (the process no longer accepts on fd).
 */
static napi_value ExclusiveAccept(napi_env env, napi_callback_info info) {
  int32_t fd;
  if (!fd_arg(env, info, "exclusiveAccept", &fd)) return NULL;
  struct uv_loop_s *loop = NULL;
  CHECK(env, napi_get_uv_event_loop(env, &loop));
  int ep = uv_backend_fd(loop);
  struct epoll_event e;
  memset(&e, 0, sizeof e);
  napi_value r;
  if (epoll_ctl(ep, EPOLL_CTL_DEL, fd, &e) < 0) {
    if (errno != ENOENT) return throw_errno(env, errno, "epoll_ctl(DEL)");
    CHECK(env, napi_get_boolean(env, false, &r));
    return r;
  }
  e.events = EPOLLIN | EPOLLEXCLUSIVE;
  e.data.fd = fd;
  if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0) {
    int err = errno;
    e.events = EPOLLIN;
    /* libuv's registration cannot be put back: this process no longer accepts on fd (ELOST) */
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0) return throw_errno(env, errno, "ELOST epoll_ctl(ADD)");
    return throw_errno(env, err, "epoll_ctl(ADD, EPOLLEXCLUSIVE)");
  }
  CHECK(env, napi_get_boolean(env, true, &r));
  return r;
}

static napi_value Init(napi_env env, napi_value exports) {
  napi_property_descriptor d[] = {
      {"spawn", NULL, Spawn, NULL, NULL, NULL, napi_default, NULL},
      {"reap", NULL, Reap, NULL, NULL, NULL, napi_default, NULL},
      {"dup", NULL, Dup, NULL, NULL, NULL, napi_default, NULL},
      {"lastWords", NULL, LastWords, NULL, NULL, NULL, napi_default, NULL},
      {"close", NULL, Close, NULL, NULL, NULL, napi_default, NULL},
      {"socketPair", NULL, SocketPair, NULL, NULL, NULL, napi_default, NULL},
      {"connectUnix", NULL, ConnectUnix, NULL, NULL, NULL, napi_default, NULL},
      {"sendBufferSize", NULL, SendBufferSize, NULL, NULL, NULL, napi_default, NULL},
      {"exclusiveAccept", NULL, ExclusiveAccept, NULL, NULL, NULL, napi_default, NULL},
  };
  if (napi_define_properties(env, exports, sizeof d / sizeof d[0], d) != napi_ok) return NULL;
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, Init)
