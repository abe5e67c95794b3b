// Command cri-reset stops and removes every pod sandbox (and so every container) the
// container runtime knows, through the CRI as the kubelet would: the runtime then runs the
// CNI DEL of each pod, unmounts what it mounted and forgets the pods. cake-cluster down runs
// it after stopping the kubelet (crictl cannot be installed on this machine kind).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	criclient "k8s.io/cri-client/pkg"
)

func main() {
	endpoint := flag.String("endpoint", "unix:///run/containerd/containerd.sock", "CRI endpoint")
	timeout := flag.Duration("timeout", 2*time.Minute, "overall deadline")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	runtime, err := criclient.NewRemoteRuntimeService(*endpoint, 10*time.Second, nil, nil)
	if err != nil {
		fail("connect %s: %v", *endpoint, err)
	}

	// Entries the CRI plugin keeps in memory for objects already gone from containerd
	// (removed behind its back, e.g. with ctr) answer NotFound: only a containerd restart
	// makes it forget them, and they hold nothing.
	removedPods, removedContainers, stale, failed := 0, 0, 0, 0
	sandboxes, err := runtime.ListPodSandbox(ctx, nil)
	if err != nil {
		fail("list pod sandboxes: %v", err)
	}
	for _, sandbox := range sandboxes {
		name := sandbox.GetMetadata().GetNamespace() + "/" + sandbox.GetMetadata().GetName()
		err := runtime.StopPodSandbox(ctx, sandbox.GetId())
		if err != nil && status.Code(err) != codes.NotFound {
			fmt.Fprintf(os.Stderr, "stop %s: %v\n", name, err)
		}
		err = runtime.RemovePodSandbox(ctx, sandbox.GetId())
		switch {
		case err == nil:
			removedPods++
		case status.Code(err) == codes.NotFound:
			stale++
		default:
			fmt.Fprintf(os.Stderr, "remove %s: %v\n", name, err)
			failed++
		}
	}

	containers, err := runtime.ListContainers(ctx, nil)
	if err != nil {
		fail("list containers: %v", err)
	}
	for _, container := range containers {
		err := runtime.RemoveContainer(ctx, container.GetId())
		switch {
		case err == nil:
			removedContainers++
		case status.Code(err) == codes.NotFound:
			stale++
		default:
			fmt.Fprintf(os.Stderr, "remove container %s: %v\n", container.GetId(), err)
			failed++
		}
	}

	fmt.Printf("CRI removed %d pods, %d other containers", removedPods, removedContainers)
	if stale > 0 {
		fmt.Printf(" (%d stale entries stay until containerd restarts)", stale)
	}
	fmt.Println()
	if failed > 0 {
		os.Exit(1)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "cri-reset: "+format+"\n", args...)
	os.Exit(2)
}
