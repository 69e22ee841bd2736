package backend

import "sync"

// subscriberBuffer is the capacity of a subscriber's channel; events past
// it wait in the subscriber's queue.
const subscriberBuffer = 256

// subscribers fans events out. Sends never block and never drop: each
// subscriber has a queue of its own, drained into its channel by a
// goroutine, so a slow D-Bus client neither stalls the Manager nor misses
// an event (a job's end, a volume's new allocation).
type subscribers struct {
	mu     sync.Mutex
	next   int
	subs   map[int]*subscription
	closed bool
}

// subscription is one subscriber: the events not yet in its channel.
type subscription struct {
	ch      chan Event
	mu      sync.Mutex
	queue   []Event
	wake    chan struct{} // an event was queued, or closing set
	done    chan struct{} // cancelled: the pump drops the rest and closes ch
	closing bool          // the Manager closed: the pump delivers the rest, then closes ch
}

// Subscribe returns a channel of events and a function that ends the
// subscription and closes the channel. Every event is delivered, in
// order: those the subscriber has not read yet wait in a queue of its
// own, so the Manager is never held up by it. Close closes every
// subscription's channel after the events queued until then (so the
// cancelled jobs' completions still reach a subscriber that reads on);
// cancel closes it at once. cancel is idempotent.
func (m *Manager) Subscribe() (events <-chan Event, cancel func()) {
	s := &m.subs
	s.mu.Lock()
	defer s.mu.Unlock()
	sub := &subscription{ch: make(chan Event, subscriberBuffer), wake: make(chan struct{}, 1), done: make(chan struct{})}
	if s.closed {
		close(sub.ch)
		return sub.ch, func() {}
	}
	if s.subs == nil {
		s.subs = map[int]*subscription{}
	}
	id := s.next
	s.next++
	s.subs[id] = sub
	go sub.pump()
	var once sync.Once
	return sub.ch, func() {
		once.Do(func() {
			s.mu.Lock()
			delete(s.subs, id)
			s.mu.Unlock()
			close(sub.done)
		})
	}
}

// pump moves queued events into the channel until the subscription ends,
// then closes the channel.
func (sub *subscription) pump() {
	defer close(sub.ch)
	for {
		sub.mu.Lock()
		batch, closing := sub.queue, sub.closing
		sub.queue = nil
		sub.mu.Unlock()
		for _, e := range batch {
			select {
			case sub.ch <- e:
			case <-sub.done:
				return
			}
		}
		if len(batch) > 0 {
			continue
		}
		if closing {
			return
		}
		select {
		case <-sub.wake:
		case <-sub.done:
			return
		}
	}
}

// emit queues e for every subscriber without blocking.
func (m *Manager) emit(e Event) {
	s := &m.subs
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sub := range s.subs {
		sub.mu.Lock()
		sub.queue = append(sub.queue, e)
		sub.mu.Unlock()
		select {
		case sub.wake <- struct{}{}:
		default: // a wake-up is pending already
		}
	}
}

func (s *subscribers) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for id, sub := range s.subs {
		sub.mu.Lock()
		sub.closing = true
		sub.mu.Unlock()
		select {
		case sub.wake <- struct{}{}:
		default:
		}
		delete(s.subs, id)
	}
}
