package main

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// dialLikeTheKubelet dials the way the kubelet's plugin watcher does (no authority set, so the
// socket path travels as :authority): the call tonic's server refused.
func dialLikeTheKubelet(t *testing.T, path string) registerapi.RegistrationClient {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///"+path,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return registerapi.NewRegistrationClient(conn)
}

func TestTheKubeletGetsTheDriverAndItsEndpointAndARefusalIsReported(t *testing.T) {
	path := socketPath(t.TempDir(), "qsd.csi.dev")
	l, err := listen(path)
	if err != nil {
		t.Fatal(err)
	}
	r := newRegistrar("qsd.csi.dev", "/var/lib/kubelet/plugins/qsd.csi.dev/csi.sock")
	server := grpc.NewServer()
	registerapi.RegisterRegistrationServer(server, r)
	go server.Serve(l)
	defer server.Stop()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kubelet := dialLikeTheKubelet(t, path)
	info, err := kubelet.GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != "CSIPlugin" || info.Name != "qsd.csi.dev" ||
		info.Endpoint != "/var/lib/kubelet/plugins/qsd.csi.dev/csi.sock" ||
		len(info.SupportedVersions) != 1 || info.SupportedVersions[0] != "1.0.0" {
		t.Fatalf("plugin info %+v", info)
	}
	if filepath.Base(path) != "qsd.csi.dev-reg.sock" {
		t.Fatalf("socket %s", path)
	}
	if _, err := kubelet.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	select {
	case reason := <-r.refused:
		t.Fatalf("a registration was taken for a refusal: %s", reason)
	default:
	}
	if _, err := kubelet.NotifyRegistrationStatus(ctx, &registerapi.RegistrationStatus{Error: "version 1.0.0 unsupported"}); err != nil {
		t.Fatal(err)
	}
	if reason := <-r.refused; reason != "version 1.0.0 unsupported" {
		t.Fatalf("refusal %q", reason)
	}
}
