#!/bin/sh
# An exec Func: the request body arrives on stdin, the answer is stdout.
# The request is described in environment variables (OpenFaaS style).
case "$FUNCATRON_OPERATION" in
  echo)
    exec cat
    ;;
  whoami)
    printf 'method=%s path=%s query=%s name=%s agent=%s\n' \
      "$Http_Method" "$Http_Path" "$Http_Query" "$FUNCATRON_PARAM_name" "$Http_X_Agent"
    ;;
  *)
    echo "unknown operation $FUNCATRON_OPERATION" >&2
    exit 2
    ;;
esac
