// Package main is hecompiler's thin cgo bridge to Lattigo v6 (CKKS with
// bootstrapping), built with -buildmode=c-shared and loaded from Python with
// ctypes (backends/lattigo/__init__.py).
//
// Contract of every exported function:
//   - it returns a *C.char error message, or NULL on success; the caller frees
//     a non-NULL message with hl_free_string;
//   - its body runs under guard(), which turns a Go panic (Lattigo panics on
//     some misuse) into such an error message, so the process never aborts;
//   - objects live in a handle table (int64 ids, guarded by a mutex) and are
//     released by hl_handle_free; results are returned through out-pointers.
//
// No program logic lives here: the Python executor drives one primitive per
// call.  See backends/lattigo/__init__.py for the conventions (levels, scales,
// rotations, bootstrapping).
package main

/*
#include <stdlib.h>
#include <stdint.h>
*/
import "C"

import (
	"encoding/json"
	"fmt"
	"runtime"
	"runtime/debug"
	"sync"
	"unsafe"
)

func main() {}

// ---------------------------------------------------------------- errors

// guard runs f and converts an error or a panic into a C string naming op.
func guard(op string, f func() error) (msg *C.char) {
	defer func() {
		if r := recover(); r != nil {
			msg = C.CString(fmt.Sprintf("%s: internal error: %v", op, r))
		}
	}()
	if err := f(); err != nil {
		return C.CString(fmt.Sprintf("%s: %v", op, err))
	}
	return nil
}

//export hl_free_string
func hl_free_string(s *C.char) {
	if s != nil {
		C.free(unsafe.Pointer(s))
	}
}

//export hl_free_buffer
func hl_free_buffer(p unsafe.Pointer) {
	if p != nil {
		C.free(p)
	}
}

// cBytes copies b into a new C buffer (freed by hl_free_buffer).
func cBytes(b []byte, out *unsafe.Pointer, n *C.longlong) {
	p := C.malloc(C.size_t(len(b) + 1))
	if p == nil {
		panic("out of memory (malloc)")
	}
	copy(unsafe.Slice((*byte)(p), len(b)), b)
	*out = p
	*n = C.longlong(len(b))
}

func cJSON(v any, out **C.char) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	*out = C.CString(string(b))
	return nil
}

// ---------------------------------------------------------------- handles

type handleTable struct {
	mu   sync.Mutex
	next int64
	objs map[int64]any
}

var handles = handleTable{next: 1, objs: map[int64]any{}}

func put(o any) int64 {
	handles.mu.Lock()
	defer handles.mu.Unlock()
	h := handles.next
	handles.next++
	handles.objs[h] = o
	return h
}

func kindOf(o any) string {
	switch o.(type) {
	case *Params:
		return "parameter set"
	case *Session:
		return "key session"
	case *Ciphertext:
		return "ciphertext"
	case *Plaintext:
		return "plaintext"
	}
	return fmt.Sprintf("%T", o)
}

func lookup[T any](h C.longlong, what string) (T, error) {
	var zero T
	handles.mu.Lock()
	o, ok := handles.objs[int64(h)]
	handles.mu.Unlock()
	if !ok {
		return zero, fmt.Errorf("no %s with handle %d (freed or never created)", what, int64(h))
	}
	t, ok := o.(T)
	if !ok {
		return zero, fmt.Errorf("handle %d is a %s, not a %s", int64(h), kindOf(o), what)
	}
	return t, nil
}

//export hl_handle_free
func hl_handle_free(h C.longlong) *C.char {
	return guard("free", func() error {
		handles.mu.Lock()
		defer handles.mu.Unlock()
		if _, ok := handles.objs[int64(h)]; !ok {
			return fmt.Errorf("no object with handle %d (freed twice or never created)", int64(h))
		}
		delete(handles.objs, int64(h))
		return nil
	})
}

//export hl_handle_count
func hl_handle_count(out *C.longlong) *C.char {
	return guard("handle_count", func() error {
		handles.mu.Lock()
		defer handles.mu.Unlock()
		*out = C.longlong(len(handles.objs))
		return nil
	})
}

// ---------------------------------------------------------------- runtime

//export hl_noop
func hl_noop(x C.longlong, out *C.longlong) *C.char {
	return guard("noop", func() error { *out = x; return nil })
}

//export hl_version
func hl_version(out **C.char) *C.char {
	return guard("version", func() error {
		return cJSON(map[string]any{
			"lattigo": lattigoVersion, "go": runtime.Version(),
			"gomaxprocs": runtime.GOMAXPROCS(0), "abi": abiVersion,
		}, out)
	})
}

//export hl_mem_stats
func hl_mem_stats(out **C.char) *C.char {
	return guard("mem_stats", func() error {
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return cJSON(map[string]any{
			"heap_alloc": m.HeapAlloc, "heap_inuse": m.HeapInuse, "heap_sys": m.HeapSys,
			"heap_released": m.HeapReleased, "sys": m.Sys, "num_gc": m.NumGC,
			"total_alloc": m.TotalAlloc,
		}, out)
	})
}

//export hl_free_os_memory
func hl_free_os_memory() *C.char {
	return guard("free_os_memory", func() error { debug.FreeOSMemory(); return nil })
}

//export hl_set_gc_percent
func hl_set_gc_percent(p C.int, old *C.int) *C.char {
	return guard("set_gc_percent", func() error { *old = C.int(debug.SetGCPercent(int(p))); return nil })
}

const lattigoVersion = "v6.1.1"
const abiVersion = 1

// int64s / float64s view C arrays without copying (valid during the call only).
func int64s(p *C.longlong, n C.longlong) []int64 {
	if n <= 0 {
		return nil
	}
	return unsafe.Slice((*int64)(unsafe.Pointer(p)), int(n))
}

func float64s(p *C.double, n C.longlong) []float64 {
	if n <= 0 {
		return nil
	}
	return unsafe.Slice((*float64)(unsafe.Pointer(p)), int(n))
}

// hl_debug_panic panics inside guard (tests check that a Go panic becomes an
// error message and the process survives).
//
//export hl_debug_panic
func hl_debug_panic() *C.char {
	return guard("debug_panic", func() error {
		var m map[string]int
		m["boom"] = 1 // nil map write: a runtime panic
		return nil
	})
}

// hl_set_memory_limit sets Go's soft memory limit (debug.SetMemoryLimit;
// bytes, < 0 only reads it) and returns the previous one: the GC works harder
// as the heap approaches it.
//
//export hl_set_memory_limit
func hl_set_memory_limit(limit C.longlong, old *C.longlong) *C.char {
	return guard("set_memory_limit", func() error {
		*old = C.longlong(debug.SetMemoryLimit(int64(limit)))
		return nil
	})
}
