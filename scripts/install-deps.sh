#!/bin/sh
# NAME        scripts/install-deps.sh — install everything PigeonDeliver and its tests need
# SYNOPSIS    sh scripts/install-deps.sh [--no-system]
# DESCRIPTION Installs Debian's dovecot-imapd, dovecot-pop3d, postfix, openbsd-inetd, python3 and
#             curl with apt-get when run as root (otherwise prints the packages to install and
#             stops), extracts Courier's imapd/pop3d .debs into .cache/courier (they conflict with
#             Dovecot in apt), then runs `npm install` and builds with `npm run build`.
#             Used by README's two set-up lines and by .ci/run, so all three stay in step.
set -eu
cd "$(dirname "$0")/.."
NEED="dovecot-imapd dovecot-pop3d postfix openbsd-inetd curl python3 courier-base courier-authlib gamin libcourier-unicode4"
if [ "${1:-}" != "--no-system" ]; then
  missing=""
  [ -x /usr/lib/dovecot/imap ] || missing="$missing dovecot-imapd"
  [ -x /usr/lib/dovecot/pop3 ] || missing="$missing dovecot-pop3d"
  [ -x /usr/sbin/postfix ] || missing="$missing postfix"
  [ -x /usr/sbin/inetd ] || missing="$missing openbsd-inetd"
  command -v curl >/dev/null 2>&1 || missing="$missing curl"
  [ -x /usr/lib/courier/courier-authlib/authdaemond ] || [ -e /usr/sbin/authdaemond ] || missing="$missing courier-authlib"
  [ -e /usr/lib/courier/courier-base ] || dpkg -s courier-base >/dev/null 2>&1 || missing="$missing courier-base gamin libcourier-unicode4"
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
  # Courier imapd/pop3d conflict with Dovecot in apt: extract their .debs into the project cache.
  if [ ! -x .cache/courier/usr/lib/courier/imapd ] && [ ! -x .cache/courier/usr/bin/imapd ]; then
    mkdir -p .cache/courier/debs
    ( cd .cache/courier/debs && apt-get download courier-imap courier-pop >/dev/null 2>&1 ) || {
      echo "install-deps: could not download courier-imap/courier-pop .debs (apt-get download)" >&2; exit 69; }
    for d in .cache/courier/debs/*.deb; do dpkg -x "$d" .cache/courier; done
  fi
fi
if [ ! -d node_modules ] || [ package.json -nt node_modules/.package-lock.json ]; then
  npm install --no-audit --no-fund --loglevel=error
fi
npm run --silent build
