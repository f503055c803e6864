// Command etcd is etcd's own server entry point, built from the Go module proxy
// (go install of go.etcd.io/etcd/server/v3 fails on its monorepo replaces, etcd#18501).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
