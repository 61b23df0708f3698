#!/bin/sh
# echo-exec: the body back (stdin to stdout).
exec cat
