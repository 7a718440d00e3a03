package main

// The runtime's agent client: dialling (pkg/agent/protocols/client/client.go),
// per-request deadlines (kata_agent.go getReqContext), and one JSON line per call.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/status"

	"pykata.test/protocols/grpc"
)

type agent struct {
	client *ttrpc.Client
	svc    grpc.AgentServiceService
	health grpc.HealthService
}

func newAgent(client *ttrpc.Client) *agent {
	return &agent{client, grpc.NewAgentServiceClient(client), grpc.NewHealthClient(client)}
}

func (a *agent) close() { a.client.Close() }

// dial: unix://PATH, or hvsock://PATH:PORT as client.go's HybridVSockDialer:
// connect to the VMM's socket, send "CONNECT <port>\n", expect a line with OK.
func dial(address string) (net.Conn, error) {
	u, err := url.Parse(address)
	if err != nil {
		return nil, err
	}
	switch u.Scheme {
	case "unix":
		return net.Dial("unix", u.Path)
	case "hvsock":
		parts := strings.Split(u.Path, ":")
		if len(parts) != 2 {
			return nil, fmt.Errorf("invalid hybrid vsock address %s", address)
		}
		port, err := strconv.ParseUint(parts[1], 10, 32)
		if err != nil {
			return nil, err
		}
		conn, err := net.DialTimeout("unix", parts[0], 30*time.Second)
		if err != nil {
			return nil, err
		}
		if _, err = fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
			conn.Close()
			return nil, err
		}
		response, err := bufio.NewReader(conn).ReadString('\n')
		emit(fields{"actor": "vmm", "handshake": response})
		if err != nil || !strings.Contains(response, "OK") {
			conn.Close()
			return nil, errors.New("HybridVsock trivial handshake failed")
		}
		return conn, nil
	}
	return nil, fmt.Errorf("unsupported address %s", address)
}

// deadline: none for WaitProcess and GetOOMEvent, none for the stream reads
// (readProcessStream uses the agent's long-lived context), 30 s for Check,
// 60 s for the rest.
func deadline(method string) time.Duration {
	switch method {
	case "WaitProcess", "GetOOMEvent", "ReadStdout", "ReadStderr":
		return 0
	case "Check":
		return 30 * time.Second
	}
	return 60 * time.Second
}

type fields map[string]interface{}

// call sends one request with its deadline and reports it: the answer's code
// and message, show(answer) when it succeeded, and extra facts about the request.
func call[Req, Resp any](
	a *agent, actor, method string,
	fn func(context.Context, Req) (Resp, error), req Req,
	show func(Resp) fields, extra ...fields,
) (Resp, error) {
	ctx := context.Background()
	if d := deadline(method); d > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, d)
		defer cancel()
	}
	resp, err := fn(ctx, req)
	st, isStatus := status.FromError(err)
	line := fields{"actor": actor, "method": method, "code": int(st.Code()), "message": st.Message()}
	if err != nil && !isStatus {
		line["client_error"] = err.Error() // not an answer: the connection is gone
	}
	if err == nil && show != nil {
		for k, v := range show(resp) {
			line[k] = v
		}
	}
	for _, more := range extra {
		for k, v := range more {
			line[k] = v
		}
	}
	emit(line)
	return resp, err
}

var output = struct {
	sync.Mutex
	*json.Encoder
}{Encoder: json.NewEncoder(os.Stdout)}

func emit(line fields) {
	output.Lock()
	defer output.Unlock()
	_ = output.Encode(line)
}

func showCheck(r *grpc.HealthCheckResponse) fields {
	return fields{"serving": r.Status.String()}
}

func showWait(r *grpc.WaitProcessResponse) fields {
	return fields{"status": r.Status}
}

func showStats(r *grpc.StatsContainerResponse) fields {
	stats := r.GetCgroupStats()
	return fields{
		"memory_usage": stats.GetMemoryStats().GetUsage().GetUsage(),
		"pids":         stats.GetPidsStats().GetCurrent(),
	}
}

// describeSpec: what the runtime left of the spec, for the test to check.
func describeSpec(spec *grpc.Spec, sandboxPidns bool) fields {
	var namespaces, mounts []string
	for _, ns := range spec.GetLinux().GetNamespaces() {
		namespaces = append(namespaces, ns.Type+"="+ns.Path)
	}
	for _, m := range spec.Mounts {
		mounts = append(mounts, fmt.Sprintf("%s %s %s %s", m.Destination, m.Type, m.Source,
			strings.Join(m.Options, ",")))
	}
	return fields{
		"namespaces":    namespaces,
		"mounts":        mounts,
		"hooks":         spec.Hooks != nil,
		"annotations":   spec.Annotations,
		"sandbox_pidns": sandboxPidns,
	}
}

func readLines(path string) ([]string, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return strings.Split(strings.TrimRight(string(raw), "\n"), "\n"), nil
}

func sleepSecond() { time.Sleep(time.Second) }
