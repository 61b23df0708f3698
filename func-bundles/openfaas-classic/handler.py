import os
import sys

body = sys.stdin.read()
sys.stdout.write(f"{os.environ.get('Http_Method')} {body.upper()} {os.environ.get('Http_X_Name', '')}")
