// Command etcd is etcd's own server entry point, built here so cake-cluster needs no
// download from GitHub: go.mod pins the release kubeadm expects.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
