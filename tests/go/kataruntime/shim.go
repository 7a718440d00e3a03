package main

// The shim's stdio copy (containerd-shim-v2 stream.go ioCopy, iostream.go,
// service.go CloseIO): stdin in WriteStdin calls of at most 32 KiB, then
// CloseStdin; stdout and stderr by ReadStdout/ReadStderr with len 32768 until
// an answer with no data (the end of the stream) or an error. A terminal has
// no stderr. The shim's fifos are replaced by an io.Reader for stdin and
// memory for the output.

import (
	"bytes"
	"fmt"
	"io"
	"sync"

	"pykata.test/protocols/grpc"
)

// bufSize: stream.go's buffer, so the length of every read and the largest write.
const bufSize = 32 << 10

type processStreams struct {
	stdout, stderr *stream
	stdinDone      chan struct{}
}

// ioCopy starts copying the process's stdio; wait() returns once it has ended.
func (r *runtime) ioCopy(actor, cid, execID string, stdin io.Reader, terminal bool) *processStreams {
	p := &processStreams{stdout: newStream(), stderr: newStream(), stdinDone: make(chan struct{})}
	go r.copyStdin(actor+" stdin", cid, execID, stdin, p.stdinDone)
	go r.readStream(actor, "ReadStdout", cid, execID, p.stdout)
	if terminal {
		p.stderr.finish()
	} else {
		go r.readStream(actor, "ReadStderr", cid, execID, p.stderr)
	}
	return p
}

func (p *processStreams) wait() {
	<-p.stdout.done
	<-p.stderr.done
	<-p.stdinDone
}

// copyStdin: io.CopyBuffer into WriteStdin, then CloseIO's CloseStdin.
func (r *runtime) copyStdin(actor, cid, execID string, stdin io.Reader, done chan struct{}) {
	defer close(done)
	a := r.agent
	buf := make([]byte, bufSize)
	for {
		n, err := stdin.Read(buf)
		if n > 0 {
			data := append([]byte{}, buf[:n]...)
			_, werr := call(a, actor, "WriteStdin", a.svc.WriteStdin, &grpc.WriteStreamRequest{
				ContainerId: cid, ExecId: execID, Data: data,
			}, func(w *grpc.WriteStreamResponse) fields {
				return fields{"written": w.Len}
			}, fields{"len": n})
			if werr != nil {
				return
			}
		}
		if err != nil {
			break
		}
	}
	_, _ = call(a, actor, "CloseStdin", a.svc.CloseStdin,
		&grpc.CloseStdinRequest{ContainerId: cid, ExecId: execID}, nil)
}

func (r *runtime) readStream(actor, method, cid, execID string, out *stream) {
	a := r.agent
	read := a.svc.ReadStdout
	name := "stdout"
	if method == "ReadStderr" {
		read, name = a.svc.ReadStderr, "stderr"
	}
	defer func() {
		out.finish()
		emit(fields{"actor": actor, "stream": name, "data": out.bytes()})
	}()
	for {
		resp, err := call(a, actor+" "+name, method, read, &grpc.ReadStreamRequest{
			ContainerId: cid, ExecId: execID, Len: bufSize,
		}, func(r *grpc.ReadStreamResponse) fields { return fields{"len": len(r.Data)} },
			fields{"requested": bufSize})
		if err != nil || len(resp.Data) == 0 {
			return
		}
		out.add(resp.Data)
	}
}

// stream: output received so far; await() blocks until some text is in it.
type stream struct {
	mu      sync.Mutex
	data    []byte
	changed chan struct{}
	done    chan struct{}
}

func newStream() *stream {
	return &stream{changed: make(chan struct{}), done: make(chan struct{})}
}

func (s *stream) add(data []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.data = append(s.data, data...)
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *stream) finish() { close(s.done) }

func (s *stream) bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte{}, s.data...)
}

func (s *stream) await(text string) {
	for {
		s.mu.Lock()
		found, changed := bytes.Contains(s.data, []byte(text)), s.changed
		s.mu.Unlock()
		if found {
			return
		}
		select {
		case <-changed:
		case <-s.done:
			if !bytes.Contains(s.bytes(), []byte(text)) {
				must(fmt.Errorf("the stream ended without %q", text))
			}
			return
		}
	}
}

// lines: a stdin the test types into, one line at a time.
type lines struct{ pending chan []byte }

func newLines() *lines { return &lines{make(chan []byte)} }

func (l *lines) send(line string) { l.pending <- []byte(line) }
func (l *lines) close()           { close(l.pending) }

func (l *lines) Read(p []byte) (int, error) {
	line, ok := <-l.pending
	if !ok {
		return 0, io.EOF
	}
	return copy(p, line), nil
}
