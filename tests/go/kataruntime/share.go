package main

// The spec as the runtime sends it: its bind mounts copied into the guest
// (container.go mountSharedDirMounts, fs_share_linux.go ShareFile with
// shared_fs=none, kata_agent.go copyFile), the mount sources replaced
// (replaceOCIMountSource), /dev/shm on the sandbox's (handleShm), and the
// spec constrained (handlePidNamespace, constrainGRPCSpec).

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"pykata.test/protocols/grpc"
)

const (
	// grpcMaxDataSize: CopyFile sends files in chunks of this size.
	grpcMaxDataSize = 1024 * 1024
	// dirMode: sandbox.go DirMode, a Go os.FileMode (ModeDir is bit 31).
	dirMode = uint32(os.ModeDir | 0o750)
)

// prepareSpec changes spec in place and says whether the container shares the
// sandbox's PID namespace.
func (r *runtime) prepareSpec(actor, cid string, spec *grpc.Spec) bool {
	for _, m := range spec.Mounts {
		if !sharedByCopy(m) {
			continue
		}
		guestPath, err := r.shareFile(actor, cid, m.Source, m.Destination)
		must(err)
		m.Source = guestPath
	}
	r.handleShm(spec.Mounts)
	sandboxPidns := handlePidNamespace(spec)
	constrainGRPCSpec(spec)
	return sandboxPidns
}

// sharedByCopy: bind mounts other than system paths, /dev/shm and devices.
func sharedByCopy(m *grpc.Mount) bool {
	for _, system := range []string{"/proc", "/sys"} {
		if m.Source == system || strings.HasPrefix(m.Source, system+"/") {
			return false
		}
	}
	if m.Type != "bind" || m.Destination == "/dev/shm" {
		return false
	}
	if m.Source == "/dev" || strings.HasPrefix(m.Source, "/dev/") {
		if info, err := os.Stat(m.Source); err != nil || !info.Mode().IsRegular() {
			return false
		}
	}
	return true
}

// shareFile copies a mount's source tree into the guest's shared directory
// as <cid>-<16 hex>-<basename of the destination>.
func (r *runtime) shareFile(actor, cid, source, destination string) (string, error) {
	random := make([]byte, 8)
	if _, err := rand.Read(random); err != nil {
		return "", err
	}
	name := fmt.Sprintf("%s-%s-%s", cid, hex.EncodeToString(random), filepath.Base(destination))
	guestPath := filepath.Join(r.pod.GuestSharedDir, name)
	root := filepath.Clean(source)
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		mode := info.Mode()
		if !mode.IsRegular() && !mode.IsDir() && mode&os.ModeSymlink == 0 {
			return nil // sockets, devices: not copied
		}
		return r.copyFile(actor, path, filepath.Join(guestPath, path[len(root):]))
	})
	return guestPath, err
}

// copyFile: one file, directory or symlink, as kata_agent.go copyFile sends it.
func (r *runtime) copyFile(actor, src, dst string) error {
	var st syscall.Stat_t
	if err := syscall.Lstat(src, &st); err != nil {
		return err
	}
	req := &grpc.CopyFileRequest{
		Path: dst, DirMode: dirMode, FileMode: st.Mode, Uid: int32(st.Uid), Gid: int32(st.Gid),
	}
	var data []byte
	switch st.Mode & syscall.S_IFMT {
	case syscall.S_IFREG:
		var err error
		if data, err = os.ReadFile(src); err != nil {
			return err
		}
		req.FileSize = int64(len(data))
	case syscall.S_IFDIR:
	case syscall.S_IFLNK:
		target, err := os.Readlink(src)
		if err != nil {
			return err
		}
		req.Data = []byte(target)
	default:
		return fmt.Errorf("unsupported file type %o", st.Mode&syscall.S_IFMT)
	}
	if req.FileSize == 0 {
		return r.sendCopy(actor, req)
	}
	for offset := int64(0); len(data) > 0; offset += grpcMaxDataSize {
		n := len(data)
		if n > grpcMaxDataSize {
			n = grpcMaxDataSize
		}
		req.Data, req.Offset = data[:n], offset
		if err := r.sendCopy(actor, req); err != nil {
			return err
		}
		data = data[n:]
	}
	return nil
}

func (r *runtime) sendCopy(actor string, req *grpc.CopyFileRequest) error {
	a := r.agent
	_, err := call(a, actor, "CopyFile", a.svc.CopyFile, req, nil, fields{
		"path": req.Path, "file_mode": req.FileMode, "dir_mode": req.DirMode,
		"file_size": req.FileSize, "offset": req.Offset, "len": len(req.Data),
	})
	return err
}

func (r *runtime) shmDir() string { return filepath.Join(r.pod.GuestSandbox, "shm") }

// handleShm: the container's /dev/shm is the sandbox's shm storage.
func (r *runtime) handleShm(mounts []*grpc.Mount) {
	for _, m := range mounts {
		if m.Destination == "/dev/shm" && m.Type != "ephemeral" {
			m.Type, m.Options, m.Source = "bind", []string{"rbind"}, r.shmDir()
		}
	}
}

// handlePidNamespace: the pid namespace is removed; a path in it meant "share".
func handlePidNamespace(spec *grpc.Spec) bool {
	namespaces := spec.Linux.Namespaces
	for i, ns := range namespaces {
		if ns.Type == "pid" {
			spec.Linux.Namespaces = append(namespaces[:i:i], namespaces[i+1:]...)
			return ns.Path != ""
		}
	}
	return false
}

// constrainGRPCSpec, with the runtime's defaults (guest seccomp and SELinux
// disabled, no VFIO, one NUMA node).
func constrainGRPCSpec(spec *grpc.Spec) {
	spec.Hooks = nil
	spec.Linux.Seccomp = nil
	if spec.Process.SelinuxLabel != "" {
		spec.Process.SelinuxLabel = ""
		spec.Linux.MountLabel = ""
	}
	if res := spec.Linux.Resources; res != nil {
		res.Devices, res.Pids, res.BlockIO, res.Network = nil, nil, nil, nil
		if res.CPU != nil {
			res.CPU.Cpus, res.CPU.Mems = "", ""
		}
	}
	var kept []*grpc.LinuxNamespace
	for _, ns := range spec.Linux.Namespaces {
		switch ns.Type {
		case "cgroup", "network", "time":
		default:
			ns.Path = ""
			kept = append(kept, ns)
		}
	}
	spec.Linux.Namespaces = kept
}
