#!/bin/sh
# NAME        scripts/link-pigeon.sh — put the `pigeon` command on the PATH
# SYNOPSIS    sh scripts/link-pigeon.sh          (scripts/install-deps.sh runs it after the build)
# DESCRIPTION As root, makes BINDIR/pigeon a symlink to this clone's dist/src/cli.cjs (BINDIR is
#             $PIGEON_BINDIR, default /usr/local/bin), but only when nothing is there yet or when
#             it is already a symlink into a pigeon clone (this one, another checkout, a moved one,
#             or the dist/src/cli.js an earlier build linked; cli.cjs starts `pigeon deliver`
#             faster, src/launcher.ts), or a dangling symlink to a dist/src/cli.cjs or cli.js
#             (a clone that was removed: that command no longer runs at all):
#             anything else there is the admin's and is left alone. Whenever it does not link, it
#             prints the one command that would. As another user it only prints that command.
# DIAGNOSTICS Messages on stderr, prefixed "link-pigeon:"; exit 0 unless dist/src/cli.cjs is
#             missing (69: run the build first).
set -eu
cd "$(dirname "$0")/.."
root=$(pwd -P)
cli="$root/dist/src/cli.cjs"
bindir=${PIGEON_BINDIR:-/usr/local/bin}
link="$bindir/pigeon"
say() { echo "link-pigeon: $*" >&2; }
hint() { say "to get the pigeon command, run as root:  ln -sfn $cli $link"; }

if [ ! -x "$cli" ]; then
  say "$cli is missing or not executable: run npm run build first"
  exit 69
fi
if [ "$(id -u)" != 0 ]; then
  hint
  exit 0
fi
if [ ! -d "$bindir" ]; then
  say "$bindir does not exist"
  hint
  exit 0
fi

# is $1 (a symlink's target) the dist/src/cli.cjs (or, linked by earlier builds, cli.js) of a pigeon clone?
pigeon_clone() {
  case "$1" in
    */dist/src/cli.cjs) pkg="${1%/dist/src/cli.cjs}/package.json" ;;
    */dist/src/cli.js) pkg="${1%/dist/src/cli.js}/package.json" ;;
    *) return 1 ;;
  esac
  [ -f "$pkg" ] && grep -q '"name": *"pigeon-deliver"' "$pkg"
}

if [ -L "$link" ]; then
  target=$(readlink "$link")
  case "$target" in
    /*) ;;
    *) target="$bindir/$target" ;;
  esac
  if [ "$target" = "$cli" ]; then
    say "$link already points to $cli"
    exit 0
  fi
  if pigeon_clone "$target"; then
    ln -sfn "$cli" "$link"
    say "$link now points to $cli (it pointed to another pigeon clone: $target)"
    exit 0
  fi
  if [ ! -e "$target" ]; then
    case "$target" in
      */dist/src/cli.cjs | */dist/src/cli.js)
        ln -sfn "$cli" "$link"
        say "$link now points to $cli (it pointed to $target, which no longer exists)"
        exit 0
        ;;
    esac
  fi
  say "$link is a symlink to $target, not a pigeon clone's: left alone"
  hint
  exit 0
fi
if [ -e "$link" ]; then
  say "$link exists and is not a symlink to a pigeon clone: left alone"
  hint
  exit 0
fi
ln -s "$cli" "$link"
say "$link -> $cli"
case ":$PATH:" in
  *":$bindir:"*) ;;
  *) say "note: $bindir is not on this shell's PATH" ;;
esac
