"""The `examples` subcommand's text."""

EXAMPLES = """\
Examples (bundle_dir: an OCI bundle, or just a rootfs directory):

# Stand-alone: the agent and the tool on one machine
  sudo KATA_AGENT_SERVER_ADDR=unix:///tmp/kata-agent.sock kata-agent &
  kata-agent-ctl connect --server-address unix:///tmp/kata-agent.sock -c Check -c Version

# ... over an abstract socket, as upstream's documentation does
  sudo KATA_AGENT_SERVER_ADDR=unix://@/tmp/foo.socket kata-agent &
  kata-agent-ctl -l debug connect --server-address unix://@/tmp/foo.socket -c Check

# A whole container lifecycle (ids are generated and remembered)
  kata-agent-ctl connect --server-address unix:///tmp/kata-agent.sock --bundle-dir "$bundle_dir" \\
      -c CreateSandbox -c CreateContainer -c StartContainer -c ReadStdout -c WaitProcess \\
      -c RemoveContainer -c DestroySandbox

# The same in one step: create, start, stream the output, wait, remove
  kata-agent-ctl connect --server-address unix:///tmp/kata-agent.sock --bundle-dir "$rootfs" \\
      -c 'run /bin/sh -c "echo hello; exit 3"'

# Values: key=value (nested and repeated fields too), json://, file://
  -c 'ExecProcess process.Args=/bin/ls process.Args=-l process.Cwd=/'
  -c "CreateSandbox hostname=sb dns='[\\"nameserver 192.0.2.1\\"]'"
  -c 'StatsContainer json://{"container_id": "'"$container_id"'"}'
  -c 'CreateContainer file:///tmp/create.json'

# A guest VM of our own (make guest-image first): boot, run, power off
  sudo kata-agent-ctl connect --vm qemu -c Check -c GetGuestDetails -c 'run /bin/uname -a'
  sudo kata-agent-ctl connect --vm qemu --bundle-dir "$bundle_dir" -c 'run /bin/ls /'
  sudo kata-agent-ctl vm --debug-console      # keep one up; prints its addresses

# QEMU: the guest's vsock CID
  guest_cid=$(sudo ss -H --vsock | awk '{print $6}' | cut -d: -f1)
  kata-agent-ctl -l debug connect --no-auto-values --server-address "vsock://${guest_cid}:1024" \\
      -c Check -c GetGuestDetails

# Cloud Hypervisor / Firecracker: hybrid vsock through the VMM's socket
  sudo kata-agent-ctl connect --server-address unix:///run/vc/vm/$sandbox_id/clh.sock \\
      --hybrid-vsock -c Check
  sudo kata-agent-ctl connect --hybrid-vsock --hybrid-vsock-port 1024 -c Check \\
      --server-address unix:///run/vc/firecracker/$sandbox_id/root/kata.hvsock

# Interactive, with history and tab completion; script-friendly output
  kata-agent-ctl connect --server-address unix:///tmp/kata-agent.sock --interactive
  kata-agent-ctl connect --server-address unix:///tmp/kata-agent.sock --output json -c Check
"""
