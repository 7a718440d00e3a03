// kataruntime: what the Kata runtime and its containerd shim send to the agent
// for a Kubernetes pod with one container, an exec and a terminal exec, in
// their order, over their transports (unix, or hybrid vsock through the VMM's
// socket). It stands in for kata-containers src/runtime (kata_agent.go,
// container.go, sandbox.go, fs_share_linux.go, pkg/agent/protocols/client,
// pkg/containerd-shim-v2) with shared_fs=none, and for the kubelet and
// containerd events that drive them (start, exec, resize, stop).
//
// The client is the runtime's kind: Go messages and the generated ttRPC
// AgentService/Health clients, made at test time from pykata's protos
// (tests/peers.py build_runtime_client) on containerd's Go ttRPC.
//
//	kataruntime -addr unix:///run/agent.sock|hvsock:///run/vmm.sock:1024 -pod pod.json
//
// Every agent call is one JSON object on stdout: actor, method, code, message
// and what the test checks of request and answer. An actor sends one call at
// a time: sandbox, pause, app, exec and tty (the runtime and the shim for
// them), "<process> stdin|stdout|stderr" (the shim's stdio copies), kubelet
// (stop requests), oom (the shim's OOM watch), monitor (a Check after the
// pod). A stream's whole data follows its end as {"actor", "stream", "data"}.
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"syscall"

	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/proto"

	"pykata.test/protocols/grpc"
)

// pod: what the test prepared (host files, specs as containerd hands them over).
type pod struct {
	SandboxID      string `json:"sandbox_id"`
	Hostname       string `json:"hostname"`
	ResolvConf     string `json:"resolv_conf"` // the sandbox's DNS (kata_agent.go:795-817)
	ShmSize        uint64 `json:"shm_size"`
	GuestSharedDir string `json:"guest_shared_dir"`  // /run/kata-containers/shared/containers
	GuestSandbox   string `json:"guest_sandbox_dir"` // /run/kata-containers/sandbox
	Pause          struct {
		ID   string `json:"id"`
		Spec string `json:"spec"`
	} `json:"pause"`
	App struct {
		ID        string `json:"id"`
		Spec      string `json:"spec"`
		Stdin     string `json:"stdin"`
		StopAfter string `json:"stop_after"` // the kubelet stops it once this is in its stdout
	} `json:"app"`
	Exec struct {
		Args  []string `json:"args"`
		Stdin string   `json:"stdin"`
	} `json:"exec"`
	Tty struct {
		Args  []string    `json:"args"`
		Lines []string    `json:"lines"`
		Sizes [][2]uint32 `json:"sizes"` // at start, then before the second line
	} `json:"tty"`
}

func main() {
	addr := flag.String("addr", "", "agent address: unix://PATH or hvsock://PATH:PORT")
	podFile := flag.String("pod", "", "the pod, as JSON")
	flag.Parse()
	var p pod
	raw, err := os.ReadFile(*podFile)
	must(err)
	must(json.Unmarshal(raw, &p))

	conn, err := dial(*addr)
	must(err)
	r := &runtime{agent: newAgent(ttrpc.NewClient(conn)), pod: p}
	r.run()

	// The kubelet's next pod, or the monitor's next Check: the agent still serves.
	conn, err = dial(*addr)
	must(err)
	monitor := newAgent(ttrpc.NewClient(conn))
	_, err = call(monitor, "monitor", "Check", monitor.health.Check, &grpc.CheckRequest{}, showCheck)
	must(err)
	monitor.close()
}

type runtime struct {
	agent *agent
	pod   pod
}

func (r *runtime) run() {
	p := r.pod
	a := r.agent
	ctx := context.Background()

	// Sandbox start (api.go CreateSandbox; kata_agent.go startSandbox).
	_, err := call(a, "sandbox", "Check", a.health.Check, &grpc.CheckRequest{}, showCheck)
	must(err)
	dns, err := readLines(p.ResolvConf)
	must(err)
	shm := &grpc.Storage{ // kata_agent.go setupSandboxStorages: no shared-fs storage with shared_fs=none
		Driver:     "ephemeral",
		Source:     "shm",
		Fstype:     "tmpfs",
		Options:    []string{"noexec", "nosuid", "nodev", "mode=1777", fmt.Sprintf("size=%d", p.ShmSize)},
		MountPoint: r.shmDir(),
	}
	_, err = call(a, "sandbox", "CreateSandbox", a.svc.CreateSandbox, &grpc.CreateSandboxRequest{
		Hostname:  p.Hostname,
		Dns:       dns,
		Storages:  []*grpc.Storage{shm},
		SandboxId: p.SandboxID,
	}, nil)
	must(err)
	_, err = call(a, "sandbox", "GetGuestDetails", a.svc.GetGuestDetails,
		&grpc.GuestDetailsRequest{MemBlockSize: true, MemHotplugProbe: true},
		func(d *grpc.GuestDetailsResponse) fields {
			return fields{
				"storage_handlers": d.GetAgentDetails().GetStorageHandlers(),
				"supports_seccomp": d.GetAgentDetails().GetSupportsSeccomp(),
			}
		})
	must(err)

	// The pause container: created and started with the sandbox. It has no
	// stdio, so the shim waits for it at once (start.go, wait.go).
	r.createContainer("pause", p.Pause.ID, p.Pause.Spec)
	r.startContainer("pause", p.Pause.ID)
	pauseStopped := make(chan struct{})
	go func() {
		defer close(pauseStopped)
		r.wait("pause", p.Pause.ID, p.Pause.ID)
		r.stopSandbox()
	}()
	oomDone := make(chan struct{})
	go func() { defer close(oomDone); r.watchOOMEvents(ctx) }()

	// The container: its files copied in, created, started, its stdio copied.
	r.createContainer("app", p.App.ID, p.App.Spec)
	r.startContainer("app", p.App.ID)
	stdin, err := os.Open(p.App.Stdin)
	must(err)
	app := r.ioCopy("app", p.App.ID, p.App.ID, stdin, false)
	appStopped := make(chan struct{})
	go func() {
		defer close(appStopped)
		app.wait()
		r.wait("app", p.App.ID, p.App.ID)
		r.stopContainer("app", p.App.ID, true)
	}()
	_, err = call(a, "app", "StatsContainer", a.svc.StatsContainer,
		&grpc.StatsContainerRequest{ContainerId: p.App.ID}, showStats)
	must(err)

	r.exec()
	r.terminalExec()

	// The kubelet stops the container: containerd's Kill without an exec id
	// is "all" to the shim, an empty exec id to the agent (service.go Kill).
	app.stdout.await(p.App.StopAfter)
	_, err = call(a, "kubelet", "SignalProcess", a.svc.SignalProcess, &grpc.SignalProcessRequest{
		ContainerId: p.App.ID, Signal: uint32(syscall.SIGTERM),
	}, nil)
	must(err)
	<-appStopped

	// ...and then the pod: SIGKILL to the pause container ends its wait, and
	// the shim stops the sandbox (wait.go -> sandbox.go Stop).
	_, err = call(a, "kubelet", "SignalProcess", a.svc.SignalProcess, &grpc.SignalProcessRequest{
		ContainerId: p.Pause.ID, Signal: uint32(syscall.SIGKILL),
	}, nil)
	must(err)
	<-pauseStopped
	<-oomDone
}

// exec: kubectl exec without a terminal (shim Exec + Start: start.go startExec).
func (r *runtime) exec() {
	a, p := r.agent, r.pod
	id := newUUID()
	_, err := call(a, "exec", "ExecProcess", a.svc.ExecProcess, &grpc.ExecProcessRequest{
		ContainerId: p.App.ID, ExecId: id, Process: r.execProcess(p.Exec.Args, false),
	}, nil)
	must(err)
	stdin, err := os.Open(p.Exec.Stdin)
	must(err)
	streams := r.ioCopy("exec", p.App.ID, id, stdin, false)
	streams.wait()
	r.wait("exec", p.App.ID, id)
}

// terminalExec: kubectl exec -it. containerd resizes the pty before it starts
// the exec; the shim sends that at once with the exec's id still empty, so
// the agent resolves it to the container's init (service.go ResizePty).
func (r *runtime) terminalExec() {
	a, p := r.agent, r.pod
	size := p.Tty.Sizes[0]
	_, _ = call(a, "tty", "TtyWinResize", a.svc.TtyWinResize, &grpc.TtyWinResizeRequest{
		ContainerId: p.App.ID, Row: size[0], Column: size[1],
	}, nil) // the shim returns the error to containerd, which goes on
	id := newUUID()
	_, err := call(a, "tty", "ExecProcess", a.svc.ExecProcess, &grpc.ExecProcessRequest{
		ContainerId: p.App.ID, ExecId: id, Process: r.execProcess(p.Tty.Args, true),
	}, nil)
	must(err)
	r.resize(id, size)
	in := newLines()
	streams := r.ioCopy("tty", p.App.ID, id, in, true)
	in.send(p.Tty.Lines[0])
	streams.stdout.await(fmt.Sprintf("%d %d", size[0], size[1]))
	r.resize(id, p.Tty.Sizes[1]) // the user resizes the window
	in.send(p.Tty.Lines[1])
	in.close()
	streams.wait()
	r.wait("tty", p.App.ID, id)
}

func (r *runtime) resize(execID string, size [2]uint32) {
	a := r.agent
	_, err := call(a, "tty", "TtyWinResize", a.svc.TtyWinResize, &grpc.TtyWinResizeRequest{
		ContainerId: r.pod.App.ID, ExecId: execID, Row: size[0], Column: size[1],
	}, nil)
	must(err)
}

// execProcess: kata_agent.go cmdToKataProcess, from containerd's exec spec
// (the container's process with the exec's args and terminal).
func (r *runtime) execProcess(args []string, terminal bool) *grpc.Process {
	env := r.appSpec().GetProcess().GetEnv()
	if terminal {
		env = append(append([]string{}, env...), "TERM=xterm")
	}
	return &grpc.Process{
		Terminal: terminal,
		User:     &grpc.User{UID: 0, GID: 0},
		Args:     args,
		Env:      env,
		Cwd:      "/",
	}
}

func (r *runtime) appSpec() *grpc.Spec {
	spec, err := loadSpec(r.pod.App.Spec)
	must(err)
	return spec
}

func (r *runtime) createContainer(actor, id, specFile string) {
	a := r.agent
	spec, err := loadSpec(specFile)
	must(err)
	sandboxPidns := r.prepareSpec(actor, id, spec)
	_, err = call(a, actor, "CreateContainer", a.svc.CreateContainer, &grpc.CreateContainerRequest{
		ContainerId: id, ExecId: id, OCI: spec, SandboxPidns: sandboxPidns,
	}, nil, describeSpec(spec, sandboxPidns))
	must(err)
}

func (r *runtime) startContainer(actor, id string) {
	a := r.agent
	_, err := call(a, actor, "StartContainer", a.svc.StartContainer,
		&grpc.StartContainerRequest{ContainerId: id}, nil)
	must(err)
}

// wait: the shim's wait() once the process's stdio has ended (wait.go).
func (r *runtime) wait(actor, id, execID string) {
	a := r.agent
	_, _ = call(a, actor, "WaitProcess", a.svc.WaitProcess,
		&grpc.WaitProcessRequest{ContainerId: id, ExecId: execID}, showWait)
}

// stopContainer: container.go stop(force) after the container's exit.
func (r *runtime) stopContainer(actor, id string, terminationLog bool) {
	a := r.agent
	_, _ = call(a, actor, "SignalProcess", a.svc.SignalProcess, &grpc.SignalProcessRequest{
		ContainerId: id, Signal: uint32(syscall.SIGKILL),
	}, nil)
	_, _ = call(a, actor, "WaitProcess", a.svc.WaitProcess,
		&grpc.WaitProcessRequest{ContainerId: id, ExecId: id}, showWait) // result ignored
	if terminationLog { // shared_fs=none and terminationMessagePolicy=File
		r.terminationMessage(actor, id)
	}
	_, err := call(a, actor, "RemoveContainer", a.svc.RemoveContainer,
		&grpc.RemoveContainerRequest{ContainerId: id}, nil)
	must(err)
	_, err = call(a, actor, "RemoveStaleVirtiofsShareMounts", a.svc.RemoveStaleVirtiofsShareMounts,
		&grpc.RemoveStaleVirtiofsShareMountsRequest{}, nil)
	must(err)
}

// stopSandbox: sandbox.go Stop - every container not stopped yet, then the
// VM (DestroySandbox, errors only logged), then disconnect.
func (r *runtime) stopSandbox() {
	a := r.agent
	r.stopContainer("pause", r.pod.Pause.ID, false)
	_, _ = call(a, "sandbox", "DestroySandbox", a.svc.DestroySandbox, &grpc.DestroySandboxRequest{}, nil)
	a.close()
}

// watchOOMEvents: the shim's loop (wait.go), one GetOOMEvent pending at a time
// without a deadline, until the agent connection is gone.
func (r *runtime) watchOOMEvents(ctx context.Context) {
	a := r.agent
	for {
		_, err := call(a, "oom", "GetOOMEvent", a.svc.GetOOMEvent, &grpc.GetOOMEventRequest{},
			func(e *grpc.OOMEvent) fields { return fields{"container_id": e.ContainerId} })
		if err != nil && (err.Error() == ttrpc.ErrClosed.Error() || err.Error() == "Dead agent") {
			return
		}
		if err != nil {
			sleepSecond()
		}
	}
}

// terminationMessage: without a shared filesystem the runtime fetches the
// container's termination message and writes it to the host file the kubelet
// reads (container.go stop).
func (r *runtime) terminationMessage(actor, id string) {
	a := r.agent
	spec := r.appSpec() // as containerd handed it over: the host's mount sources
	if spec.Annotations["io.kubernetes.container.terminationMessagePolicy"] != "File" {
		return
	}
	path := spec.Annotations["io.kubernetes.container.terminationMessagePath"]
	resp, err := call(a, actor, "GetDiagnosticData", a.svc.GetDiagnosticData,
		&grpc.GetDiagnosticDataRequest{LogType: "termination_log", ContainerId: id},
		func(d *grpc.GetDiagnosticDataResponse) fields { return fields{"data": d.Data} })
	if err != nil || resp.Data == "" {
		return
	}
	for _, m := range spec.Mounts {
		if m.Destination == path {
			must(os.WriteFile(m.Source, []byte(resp.Data), 0o644))
		}
	}
}

func loadSpec(path string) (*grpc.Spec, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var spec grpc.Spec
	return &spec, proto.Unmarshal(raw, &spec)
}

func newUUID() string {
	var b [16]byte
	_, err := rand.Read(b[:])
	must(err)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

func must(err error) {
	if err != nil {
		emit(fields{"fatal": err.Error()})
		os.Exit(1)
	}
}
