"""Hold every file of a SoftHSM2 token locked (fcntl), as a wedged process would.

SoftHSM2 takes fcntl locks on its token files for every access, so while
this runs, any call that touches the token blocks. Prints READY once the
locks are held; releases them when its standard input closes.
"""

import fcntl
import os
import sys

held = []
for root, _, files in os.walk(sys.argv[1]):
    for name in files:
        fd = os.open(os.path.join(root, name), os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        held.append(fd)
print("READY", flush=True)
sys.stdin.read()
