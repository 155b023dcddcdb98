"""Stand-in for the ssh client in tests: runs the "remote" command on this machine.

Skips options, takes the host, and runs the rest with ``sh -c`` in a new session,
as sshd would, with stdin still connected to the launcher. Like a real client whose
connection drops, it dies on SIGTERM without touching the command. Each call is
logged to ``$FAKE_SSH_LOG`` when set.
"""

import os
import subprocess
import sys

argv = sys.argv[1:]
while argv and argv[0].startswith("-"):
    if argv.pop(0) in ("-o", "-p", "-i", "-l"):
        argv.pop(0)
host, command = argv[0], " ".join(argv[1:])
if os.environ.get("FAKE_SSH_LOG"):
    with open(os.environ["FAKE_SSH_LOG"], "a") as log:
        log.write(host + "\n")
sys.exit(subprocess.call(["sh", "-c", command], start_new_session=True))
