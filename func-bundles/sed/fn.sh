#!/bin/sh
# The body through sed; the `e` option (query parameter) is the script.
# `--posix` and `--sandbox` (GNU sed): no `e`, `r` or `w` commands, so
# the script cannot run programs or touch files.
if [ -n "$FUNCATRON_QUERY_e" ]; then
  exec sed --posix --sandbox -e "$FUNCATRON_QUERY_e"
fi
exec cat
