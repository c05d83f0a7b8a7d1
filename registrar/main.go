// Command qsd-csi-registrar registers qsd-csi's node plugin with the kubelet.
//
// The kubelet's plugin watcher finds <registration-dir>/<driver>-reg.sock and asks it, through the
// kubelet's plugin registration API (k8s.io/kubelet, pluginregistration/v1), what it is: a CSI
// driver, its name, and the CSI socket the kubelet should call. Then it says whether it took it.
// This is the job node-driver-registrar does elsewhere; its module is not served by the Go module
// proxy this project builds from, so this small equivalent is built on the kubelet's own API
// package and grpc-go.
//
// Why Go and not the Rust node plugin: the kubelet dials this socket without naming an authority,
// so grpc-go sends the socket's path as the HTTP/2 :authority, and Rust's HTTP/2 server (h2,
// under tonic) refuses that as malformed. grpc-go's server accepts it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// csiVersions are the CSI versions the kubelet may speak to the driver.
var csiVersions = []string{"1.0.0"}

// registrar answers the kubelet's plugin watcher.
type registrar struct {
	registerapi.UnimplementedRegistrationServer
	info registerapi.PluginInfo
	// refused is told the kubelet's reason when it does not take the driver.
	refused chan string
}

func newRegistrar(driver, endpoint string) *registrar {
	return &registrar{
		info: registerapi.PluginInfo{
			Type:              registerapi.CSIPlugin,
			Name:              driver,
			Endpoint:          endpoint,
			SupportedVersions: csiVersions,
		},
		refused: make(chan string, 1),
	}
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              r.info.Type,
		Name:              r.info.Name,
		Endpoint:          r.info.Endpoint,
		SupportedVersions: r.info.SupportedVersions,
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if s.PluginRegistered {
		log.Printf("the kubelet registered the driver %s (CSI endpoint %s)", r.info.Name, r.info.Endpoint)
	} else {
		log.Printf("the kubelet refused the driver %s: %s", r.info.Name, s.Error)
		select {
		case r.refused <- s.Error:
		default:
		}
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// socketPath is where the kubelet looks for the driver's registration socket.
func socketPath(dir, driver string) string {
	return filepath.Join(dir, driver+"-reg.sock")
}

// listen listens on the registration socket (0600), replacing one a killed registrar left.
func listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	return l, os.Chmod(path, 0o600)
}

// waitForSocket waits until the CSI socket exists, so the kubelet is never sent to a driver that
// is not serving yet.
func waitForSocket(ctx context.Context, path string) error {
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the CSI socket %s never appeared", path)
		case <-time.After(200 * time.Millisecond): // poll interval
		}
	}
}

func run() error {
	driver := flag.String("driver-name", "qsd.csi.dev", "the CSI driver's name")
	csiAddress := flag.String("csi-address", "", "the CSI socket as this container sees it (waited for before registering)")
	endpoint := flag.String("kubelet-registration-path", "", "the CSI socket as the kubelet reaches it")
	dir := flag.String("registration-dir", "/registration", "the kubelet's plugins_registry directory")
	flag.Parse()
	if *endpoint == "" {
		return errors.New("--kubelet-registration-path is required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if *csiAddress != "" {
		wait, cancel := context.WithTimeout(ctx, 5*time.Minute)
		err := waitForSocket(wait, *csiAddress)
		cancel()
		if err != nil {
			return err
		}
	}
	path := socketPath(*dir, *driver)
	l, err := listen(path)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", path, err)
	}
	defer os.Remove(path)
	r := newRegistrar(*driver, *endpoint)
	server := grpc.NewServer()
	registerapi.RegisterRegistrationServer(server, r)
	served := make(chan error, 1)
	go func() { served <- server.Serve(l) }()
	log.Printf("serving %s for the kubelet (driver %s, CSI endpoint %s)", path, *driver, *endpoint)
	select {
	case <-ctx.Done():
		server.GracefulStop()
		return nil
	case reason := <-r.refused:
		// As node-driver-registrar does: exit, so the container restarts and registers again.
		server.Stop()
		return fmt.Errorf("the kubelet refused the driver: %s", reason)
	case err := <-served:
		return err
	}
}

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	if err := run(); err != nil {
		log.Fatal(err)
	}
}
