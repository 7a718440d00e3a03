"""The `examples` subcommand's text: every example works as pasted, in this order,
once the variables at the top are set (the tests paste each one)."""

EXAMPLES = """\
Set these first; the examples use them (run them as root: containers need it):

  agent=unix:///tmp/kata-agent.sock  # where the agent serves (also unix://@NAME, vsock://CID:1024)
  rootfs=$PWD/rootfs                 # a root filesystem: busybox-static and its links will do

# An agent on this machine; wait until it answers
  KATA_AGENT_SERVER_ADDR=$agent kata-agent 2>>kata-agent.log &
  until kata-agent-ctl connect --server-address "$agent" -c Check &>/dev/null; do sleep .2; done

# Is it there, which version
  kata-agent-ctl connect --server-address "$agent" -c Check -c Version

# A container, as docker run --rm runs one: its output, its exit status, then removed
  kata-agent-ctl connect --server-address "$agent" --bundle-dir "$rootfs" \\
      -c 'run /bin/sh -c "echo hello; exit 3"'; echo "exit status $?"

# Output is bytes, exactly; input with -i (or from a pipe); a terminal with -it
  kata-agent-ctl connect --server-address "$agent" --bundle-dir "$rootfs" \\
      -c 'run /bin/tar -c -C /etc .' | tar -t
  echo hello | kata-agent-ctl connect --server-address "$agent" --bundle-dir "$rootfs" \\
      -c 'run -i tr a-z A-Z'
  kata-agent-ctl connect --server-address "$agent" --bundle-dir "$rootfs" -c 'run -it /bin/sh'

# A whole lifecycle, call by call (ids are generated and remembered)
  kata-agent-ctl connect --server-address "$agent" --bundle-dir "$rootfs" \\
      -c 'CreateSandbox hostname=box' -c 'CreateContainer OCI.Process.Args=/bin/hostname' \\
      -c StartContainer -c ReadStdout -c WaitProcess -c RemoveContainer -c DestroySandbox

# A process in a running container, a signal by name, stdin with escapes
  kata-agent-ctl connect --server-address "$agent" --bundle-dir "$rootfs" \\
      -c 'CreateContainer OCI.Process.Args=/bin/sleep OCI.Process.Args=60' -c StartContainer \\
      -c 'ExecProcess process.Args=/bin/ls process.Args=-l process.Args=/ process.Cwd=/' \\
      -c ReadStdout -c WaitProcess -c 'SignalProcess exec_id= signal=TERM' \\
      -c 'WaitProcess exec_id=' -c RemoveContainer
  kata-agent-ctl connect --server-address "$agent" --bundle-dir "$rootfs" \\
      -c 'CreateContainer OCI.Process.Args=/bin/cat' -c StartContainer \\
      -c 'WriteStdin data="line 1\\nline 2\\n"' -c CloseStdin -c ReadStdout -c WaitProcess \\
      -c RemoveContainer

# Requests as JSON, inline or from a file
  kata-agent-ctl connect --server-address "$agent" \\
      -c 'GetGuestDetails json://{"mem_block_size": true}'
  echo '{"mem_block_size": true, "mem_hotplug_probe": true}' > /tmp/details.json
  kata-agent-ctl connect --server-address "$agent" -c 'GetGuestDetails file:///tmp/details.json'

# Metrics as Prometheus text; JSON lines for scripts
  kata-agent-ctl connect --server-address "$agent" -c GetMetrics | grep '^kata_agent_process'
  kata-agent-ctl connect --server-address "$agent" --bundle-dir "$rootfs" --output json \\
      -c Check -c 'run /bin/echo hi'

# Every request as sent, in the log (stderr)
  kata-agent-ctl -l debug connect --server-address "$agent" -c 'GetGuestDetails mem_block_size=true'

# Interactive: history, tab completion (help <TAB>, OCI.Pro<TAB>); Ctrl-D leaves
  kata-agent-ctl connect --server-address "$agent" --bundle-dir "$rootfs" --interactive

# Cloud Hypervisor or Firecracker: hybrid vsock through the VMM's socket ($sandbox_id: the pod's)
  kata-agent-ctl connect --hybrid-vsock -c Check \\
      --server-address "unix:///run/vc/vm/$sandbox_id/clh.sock"
  kata-agent-ctl connect --hybrid-vsock --hybrid-vsock-port 1024 -c Check \\
      --server-address "unix:///run/vc/firecracker/$sandbox_id/root/kata.hvsock"

# QEMU: vsock to the guest ($guest_cid: its guest-cid=N in QEMU's -device vhost-vsock-pci)
  kata-agent-ctl connect --server-address "vsock://$guest_cid:1024" -c Check

# A guest VM of our own (make guest-image first): boot it, run, power it off
  kata-agent-ctl connect --vm qemu -c Check -c 'run /bin/uname -a'

# Stop the agent (it removes its containers first)
  kill %1
"""
