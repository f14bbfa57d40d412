#!/bin/sh
# NAME        scripts/install-deps.sh — install everything PigeonDeliver and its tests need
# SYNOPSIS    sh scripts/install-deps.sh [--no-system]
# DESCRIPTION Installs with apt-get, when run as root (otherwise prints the packages to install and
#             stops), the Debian packages in NEED: Dovecot (core, imapd, pop3d, lmtpd, sieve),
#             postfix, openbsd-inetd, postgresql, clamav-daemon, haproxy, systemd, gsasl, curl,
#             python3, g++ and make (node-gyp builds native/pigeon_spawn.c), iproute2, util-linux,
#             Courier's libraries and gamin (COURIER_LIBS). The tests
#             start private servers of their own (initdb/pg_ctl, clamd -c, haproxy -f, a second
#             dovecot -c); the packaged services are not needed and may stay stopped. Then extracts
#             Courier's imapd/pop3d .debs into .cache/courier (they conflict with Dovecot in apt),
#             runs `npm install`, builds with `npm run build` and puts `pigeon` on the PATH
#             (scripts/link-pigeon.sh: as root a symlink in /usr/local/bin).
#             Used by README's two set-up lines and by .ci/run, so all three stay in step.
set -eu
cd "$(dirname "$0")/.."
# Courier's imapd/pop3d need: courier-base, courier-authlib (libcourierauth), libcourier-unicode4,
# libgamin0 (libfam.so.0), libgdbm6, libidn12, and gamin (gam_server in /usr/libexec, where libfam
# looks for it: without it every Courier IMAP login waits ~1.2 s and IDLE cannot push new mail).
COURIER_LIBS="courier-base courier-authlib gamin libgamin0 libcourier-unicode4 libgdbm6 libidn12"
NEED="dovecot-core dovecot-imapd dovecot-pop3d dovecot-lmtpd dovecot-sieve postfix openbsd-inetd postgresql curl python3 iproute2 util-linux strace clamav-daemon $COURIER_LIBS"
# the PROXY protocol test runs HAProxy in front; the systemd test needs systemd-socket-activate and
# systemd-analyze (package systemd; a minimal image has no systemd), no PID 1
NEED="$NEED haproxy systemd"
NEED="$NEED gsasl"
# contrib/fail2ban is checked with fail2ban-regex/fail2ban-client; man/ pages are rendered with man(1)
NEED="$NEED fail2ban man-db"
# npm install builds the spawner's vfork module (native/pigeon_spawn.c) with node-gyp
NEED="$NEED g++ make"
if [ "${1:-}" != "--no-system" ]; then
  missing=""
  # the upstream backend's tests run a second, independent Dovecot (its master: dovecot-core)
  [ -x /usr/sbin/dovecot ] || missing="$missing dovecot-core"
  [ -x /usr/lib/dovecot/imap ] || missing="$missing dovecot-imapd"
  [ -x /usr/lib/dovecot/lmtp ] || missing="$missing dovecot-lmtpd"
  [ -x /usr/lib/dovecot/pop3 ] || missing="$missing dovecot-pop3d"
  # mailstore.mda dovecot-lda with Sieve (test/deliver-sieve.test.ts): Pigeonhole's LDA plugin
  [ -f /usr/lib/dovecot/modules/lib90_sieve_plugin.so ] || missing="$missing dovecot-sieve"
  [ -x /usr/sbin/postfix ] || missing="$missing postfix"
  [ -x /usr/sbin/inetd ] || missing="$missing openbsd-inetd"
  # PostgreSQL: initdb of any installed major version (Debian puts it under /usr/lib/postgresql/N/bin)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
  command -v curl >/dev/null 2>&1 || missing="$missing curl"
  # the partition test: network namespaces and veth (ip), the server's user inside one (setpriv)
  command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
  command -v setpriv >/dev/null 2>&1 || missing="$missing util-linux"
  # the antivirus tests start a private clamd (its own config and test signature: no freshclam)
  [ -x /usr/sbin/clamd ] || missing="$missing clamav-daemon"
  [ -x /usr/sbin/haproxy ] || missing="$missing haproxy"
  command -v systemd-socket-activate >/dev/null 2>&1 && command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
  command -v gsasl >/dev/null 2>&1 || missing="$missing gsasl"
  # the group-commit test counts fsync(2) calls with strace
  [ -x /usr/bin/strace ] || missing="$missing strace"
  [ -x /usr/bin/fail2ban-regex ] || missing="$missing fail2ban"
  [ -x /usr/bin/man ] || missing="$missing man-db"
  command -v g++ >/dev/null 2>&1 || missing="$missing g++"
  command -v make >/dev/null 2>&1 || missing="$missing make"
  for p in $COURIER_LIBS; do
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing="$missing $p"
  done
  [ -x /usr/libexec/gam_server ] || case "$missing" in *" gamin"*) ;; *) missing="$missing gamin" ;; esac
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "install-deps: apt-get install$missing" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null
      # postfix asks debconf questions; answer "No configuration" so it never touches the host MTA
      echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
      apt-get install -y -qq --no-install-recommends $NEED >/dev/null
    else
      echo "install-deps: missing Debian packages:$missing" >&2
      echo "install-deps: run as root: apt-get install$missing" >&2
      exit 69
    fi
  fi
  # Courier imapd/pop3d conflict with Dovecot in apt: extract their .debs into the project cache
  # (the binaries the tests point courier.imapd / courier.pop3d at; never unpacked into /).
  if [ ! -x .cache/courier/usr/bin/imapd ] || [ ! -x .cache/courier/usr/lib/courier/courier/courierpop3d ]; then
    mkdir -p .cache/courier/debs
    rm -f .cache/courier/debs/*.deb
    fetch() { ( cd .cache/courier/debs && apt-get download courier-imap courier-pop >/dev/null 2>&1 ); }
    # a fresh machine may have no package lists yet
    fetch || { [ "$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && fetch; } || {
      echo "install-deps: could not download courier-imap/courier-pop .debs (apt-get download)" >&2; exit 69; }
    for d in .cache/courier/debs/*.deb; do dpkg -x "$d" .cache/courier; done
    [ -x .cache/courier/usr/bin/imapd ] && [ -x .cache/courier/usr/lib/courier/courier/courierpop3d ] || {
      echo "install-deps: .cache/courier lacks usr/bin/imapd or usr/lib/courier/courier/courierpop3d after dpkg -x" >&2; exit 69; }
  fi
fi
if [ ! -d node_modules ] || [ package.json -nt node_modules/.package-lock.json ]; then
  npm install --no-audit --no-fund --loglevel=error
fi
npm run --silent build
# the pigeon command: as root /usr/local/bin/pigeon -> this clone's dist/src/cli.cjs (never
# replacing anything that is not a link into a pigeon clone); otherwise the command to run
sh scripts/link-pigeon.sh
