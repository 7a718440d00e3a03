// ttrpcpeer: containerd's Go ttRPC (Debian golang-github-containerd-ttrpc-dev)
// as an independent peer for pykata's interop tests and benchmarks.
// Messages are built at run time from the reference descriptor set
// (shared/reference/kata-agent-api.binpb), so nothing here is pykata's code.
//
//	ttrpcpeer -desc FILE server -socket PATH
//	ttrpcpeer -desc FILE client -socket PATH -op OP [-n N] [-c C]
//
// Every result is one JSON object per line on stdout.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	gogoproto "github.com/gogo/protobuf/proto"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"
)

// msg adapts a dynamic (descriptor-driven) message to the gogo interfaces ttrpc's codec uses.
type msg struct{ m *dynamicpb.Message }

func (x *msg) Reset()                   { x.m = dynamicpb.NewMessage(x.m.Descriptor()) }
func (x *msg) String() string           { return fmt.Sprint(x.m) }
func (x *msg) ProtoMessage()            {}
func (x *msg) Marshal() ([]byte, error) { return proto.Marshal(x.m) }
func (x *msg) Unmarshal(b []byte) error { return proto.Unmarshal(b, x.m) }

var _ gogoproto.Message = (*msg)(nil)

var files interface {
	FindDescriptorByName(protoreflect.FullName) (protoreflect.Descriptor, error)
}

func newMsg(name string) *msg {
	d, err := files.FindDescriptorByName(protoreflect.FullName(name))
	if err != nil {
		fatal(err)
	}
	return &msg{dynamicpb.NewMessage(d.(protoreflect.MessageDescriptor))}
}

func field(m *msg, name string) protoreflect.FieldDescriptor {
	return m.m.Descriptor().Fields().ByName(protoreflect.Name(name))
}

func emit(v map[string]interface{}) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func fatal(err error) {
	emit(map[string]interface{}{"fatal": err.Error()})
	os.Exit(1)
}

func loadDescriptors(path string) {
	raw, err := ioutil.ReadFile(path)
	if err != nil {
		fatal(err)
	}
	var set descriptorpb.FileDescriptorSet
	if err := proto.Unmarshal(raw, &set); err != nil {
		fatal(err)
	}
	f, err := protodesc.NewFiles(&set)
	if err != nil {
		fatal(err)
	}
	files = f
}

// --- server -----------------------------------------------------------------

func serve(socket string) {
	os.Remove(socket)
	l, err := net.Listen("unix", socket)
	if err != nil {
		fatal(err)
	}
	s, err := ttrpc.NewServer()
	if err != nil {
		fatal(err)
	}
	s.Register("grpc.Health", map[string]ttrpc.Method{
		"Check": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			req := newMsg("grpc.CheckRequest")
			if err := unmarshal(req); err != nil {
				return nil, err
			}
			resp := newMsg("grpc.HealthCheckResponse")
			resp.m.Set(field(resp, "status"), protoreflect.ValueOfEnum(1))
			return resp, nil
		},
		"Version": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			req := newMsg("grpc.CheckRequest")
			if err := unmarshal(req); err != nil {
				return nil, err
			}
			resp := newMsg("grpc.VersionCheckResponse")
			resp.m.Set(field(resp, "grpc_version"), protoreflect.ValueOfString("go-ttrpc-peer"))
			// Echo metadata so the caller can see what arrived.
			md, _ := ttrpc.GetMetadata(ctx)
			var parts []string
			for k, vs := range md {
				for _, v := range vs {
					parts = append(parts, k+"="+v)
				}
			}
			resp.m.Set(field(resp, "agent_version"), protoreflect.ValueOfString(strings.Join(parts, ",")))
			return resp, nil
		},
	})
	// The "service" field names a duration to sleep, then it is echoed back:
	// lets a caller make answers arrive out of order, or miss a deadline.
	s.Register("pykata.test.Peer", map[string]ttrpc.Method{
		"Sleep": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			req := newMsg("grpc.CheckRequest")
			if err := unmarshal(req); err != nil {
				return nil, err
			}
			d, err := time.ParseDuration(req.m.Get(field(req, "service")).String())
			if err != nil {
				return nil, err
			}
			select {
			case <-time.After(d):
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			return req, nil
		},
	})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sig; s.Close(); os.Remove(socket); os.Exit(0) }()
	emit(map[string]interface{}{"listening": socket})
	if err := s.Serve(context.Background(), l); err != nil && !strings.Contains(err.Error(), "closed") {
		fatal(err)
	}
}

// --- client -----------------------------------------------------------------

func check(ctx context.Context, c *ttrpc.Client) error {
	resp := newMsg("grpc.HealthCheckResponse")
	return c.Call(ctx, "grpc.Health", "Check", newMsg("grpc.CheckRequest"), resp)
}

func statusOf(err error) map[string]interface{} {
	st, _ := status.FromError(err)
	return map[string]interface{}{"code": int(st.Code()), "message": st.Message()}
}

func rate(c *ttrpc.Client, n, conc int) float64 {
	var wg sync.WaitGroup
	start := time.Now()
	per := n / conc
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < per; i++ {
				if err := check(context.Background(), c); err != nil {
					fatal(err)
				}
			}
		}()
	}
	wg.Wait()
	return float64(per*conc) / time.Since(start).Seconds()
}

// rawOversize writes a frame whose header announces 5 MiB (and sends it),
// reads the answer, then checks the same connection still serves a request.
func rawOversize(conn net.Conn) {
	const size = 5 << 20
	hdr := make([]byte, 10)
	binary.BigEndian.PutUint32(hdr[0:4], size)
	binary.BigEndian.PutUint32(hdr[4:8], 1)
	hdr[8] = 1
	conn.Write(append(hdr, make([]byte, size)...))
	first := readResponse(conn)
	req := &ttrpc.Request{Service: "grpc.Health", Method: "Check"}
	body, _ := gogoproto.Marshal(req)
	binary.BigEndian.PutUint32(hdr[0:4], uint32(len(body)))
	binary.BigEndian.PutUint32(hdr[4:8], 3)
	conn.Write(append(hdr, body...))
	second := readResponse(conn)
	emit(map[string]interface{}{"op": "oversize", "first": first, "second": second})
}

func readResponse(conn net.Conn) map[string]interface{} {
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(conn, hdr); err != nil {
		fatal(err)
	}
	body := make([]byte, binary.BigEndian.Uint32(hdr[0:4]))
	if _, err := io.ReadFull(conn, body); err != nil {
		fatal(err)
	}
	var resp ttrpc.Response
	if err := gogoproto.Unmarshal(body, &resp); err != nil {
		fatal(err)
	}
	out := map[string]interface{}{"stream": binary.BigEndian.Uint32(hdr[4:8]), "type": hdr[8], "code": 0}
	if resp.Status != nil {
		out["code"] = resp.Status.Code
		out["message"] = resp.Status.Message
	}
	return out
}

var callService, callMethod, callRequest *string

func client(socket, op string, n, conc int) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		fatal(err)
	}
	if op == "oversize" {
		rawOversize(conn)
		return
	}
	c := ttrpc.NewClient(conn)
	defer c.Close()
	ctx := context.Background()
	switch op {
	case "check":
		resp := newMsg("grpc.HealthCheckResponse")
		err := c.Call(ctx, "grpc.Health", "Check", newMsg("grpc.CheckRequest"), resp)
		emit(map[string]interface{}{"op": op, "status": statusOf(err), "serving": resp.m.Get(field(resp, "status")).Enum()})
	case "version":
		resp := newMsg("grpc.VersionCheckResponse")
		err := c.Call(ctx, "grpc.Health", "Version", newMsg("grpc.CheckRequest"), resp)
		emit(map[string]interface{}{"op": op, "status": statusOf(err),
			"grpc_version": resp.m.Get(field(resp, "grpc_version")).String(),
			"agent_version": resp.m.Get(field(resp, "agent_version")).String()})
	case "unknown":
		err := c.Call(ctx, "grpc.AgentService", "NoSuchMethod", newMsg("grpc.CheckRequest"), newMsg("grpc.CheckRequest"))
		emit(map[string]interface{}{"op": op, "status": statusOf(err)})
		err = c.Call(ctx, "no.Such", "Thing", newMsg("grpc.CheckRequest"), newMsg("grpc.CheckRequest"))
		emit(map[string]interface{}{"op": "unknown-service", "status": statusOf(err)})
	case "send-oversize":
		req := newMsg("grpc.CheckRequest")
		req.m.Set(field(req, "service"), protoreflect.ValueOfString(strings.Repeat("x", 5<<20)))
		err := c.Call(ctx, "grpc.Health", "Check", req, newMsg("grpc.HealthCheckResponse"))
		emit(map[string]interface{}{"op": op, "status": statusOf(err)})
		emit(map[string]interface{}{"op": "after-oversize", "status": statusOf(check(ctx, c))})
	case "concurrent":
		var wg sync.WaitGroup
		errs := make(chan error, n)
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() { defer wg.Done(); errs <- check(ctx, c) }()
		}
		wg.Wait()
		close(errs)
		ok := 0
		for err := range errs {
			if err == nil {
				ok++
			}
		}
		emit(map[string]interface{}{"op": op, "calls": n, "ok": ok})
	case "call":
		// Any method of any service in the descriptor set, request and response as JSON.
		d, err := files.FindDescriptorByName(protoreflect.FullName(*callService))
		if err != nil {
			fatal(err)
		}
		m := d.(protoreflect.ServiceDescriptor).Methods().ByName(protoreflect.Name(*callMethod))
		if m == nil {
			fatal(fmt.Errorf("no method %s in %s", *callMethod, *callService))
		}
		req := &msg{dynamicpb.NewMessage(m.Input())}
		if err := protojson.Unmarshal([]byte(*callRequest), req.m); err != nil {
			fatal(err)
		}
		resp := &msg{dynamicpb.NewMessage(m.Output())}
		err = c.Call(ctx, *callService, *callMethod, req, resp)
		body, _ := protojson.Marshal(resp.m)
		emit(map[string]interface{}{"op": op, "status": statusOf(err), "response": json.RawMessage(body)})
	case "read-stdout":
		// The shim's loop: ReadStdout (request as JSON) until the empty answer.
		d, err := files.FindDescriptorByName("grpc.AgentService")
		if err != nil {
			fatal(err)
		}
		m := d.(protoreflect.ServiceDescriptor).Methods().ByName("ReadStdout")
		req := &msg{dynamicpb.NewMessage(m.Input())}
		if err := protojson.Unmarshal([]byte(*callRequest), req.m); err != nil {
			fatal(err)
		}
		data := m.Output().Fields().ByName("data")
		total := 0
		start := time.Now()
		for {
			resp := &msg{dynamicpb.NewMessage(m.Output())}
			if err := c.Call(ctx, "grpc.AgentService", "ReadStdout", req, resp); err != nil {
				fatal(err)
			}
			got := len(resp.m.Get(data).Bytes())
			if got == 0 {
				break
			}
			total += got
		}
		secs := time.Since(start).Seconds()
		emit(map[string]interface{}{"op": op, "bytes": total, "mib_s": float64(total) / secs / (1 << 20)})
	case "bench":
		rate(c, n/10+1, conc) // warm-up
		emit(map[string]interface{}{"op": op, "calls": n, "concurrency": conc, "rate": rate(c, n, conc)})
	default:
		fatal(fmt.Errorf("unknown op %q", op))
	}
}

func main() {
	desc := flag.String("desc", "", "FileDescriptorSet with the agent API")
	flag.Parse()
	loadDescriptors(*desc)
	args := flag.Args()
	if len(args) == 0 {
		fatal(fmt.Errorf("usage: ttrpcpeer -desc FILE server|client ..."))
	}
	sub := flag.NewFlagSet(args[0], flag.ExitOnError)
	socket := sub.String("socket", "", "unix socket path")
	op := sub.String("op", "check", "client operation")
	n := sub.Int("n", 1000, "calls")
	conc := sub.Int("c", 1, "concurrent callers")
	callService = sub.String("service", "grpc.AgentService", "service, for -op call")
	callMethod = sub.String("method", "", "method, for -op call")
	callRequest = sub.String("request", "{}", "request as JSON, for -op call")
	sub.Parse(args[1:])
	switch args[0] {
	case "server":
		serve(*socket)
	case "client":
		client(*socket, *op, *n, *conc)
	default:
		fatal(fmt.Errorf("unknown command %q", args[0]))
	}
}
