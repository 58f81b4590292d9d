// The page side of a WebRTC call between two browsers that cannot reach each other except
// through the relay (tests/tests/chromium_call.rs). Evaluated in both pages; the test passes
// the SDP between them (non-trickle: each description carries every candidate), so no
// signalling server is needed in any namespace. Every wait is bounded: a promise that does
// not settle would otherwise hold Runtime.evaluate until the Rust deadline, with less said.
(() => {
  const within = (ms, what, promise) => {
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
  };

  const turnServer = (turn) => ({
    urls: turn.url,
    username: turn.username,
    credential: turn.credential,
  });

  // Resolves with the full local description once gathering is over.
  const gathered = async (pc, ms) => {
    if (pc.iceGatheringState !== "complete") {
      await within(
        ms,
        "ICE gathering",
        new Promise((resolve) => {
          pc.addEventListener("icegatheringstatechange", () => {
            if (pc.iceGatheringState === "complete") resolve();
          });
        })
      );
    }
    return pc.localDescription.sdp;
  };

  const nextMessage = (channel, ms) =>
    within(
      ms,
      "a data-channel message",
      new Promise((resolve) => {
        channel.addEventListener("message", (event) => resolve(event.data), { once: true });
      })
    );

  const opened = (channel, ms) =>
    channel.readyState === "open"
      ? Promise.resolve()
      : within(
          ms,
          `the data channel opening (${channel.readyState})`,
          new Promise((resolve) => channel.addEventListener("open", resolve, { once: true }))
        );

  const describe = (stats, id) => {
    const candidate = stats.get(id);
    return candidate
      ? {
          type: candidate.candidateType,
          protocol: candidate.protocol,
          relayProtocol: candidate.relayProtocol ?? null,
          address: candidate.address,
          port: candidate.port,
        }
      : null;
  };

  const call = {
    pc: null,
    channel: null,
    partyPc: null,

    // External side: relay candidates only, through `turn`; the data channel gives the offer
    // an m=application section, so ICE, DTLS and SCTP run without any media.
    async offer(turn, ms) {
      this.pc = new RTCPeerConnection({
        iceServers: [turnServer(turn)],
        iceTransportPolicy: "relay",
      });
      this.channel = this.pc.createDataChannel("rampart");
      await this.pc.setLocalDescription();
      return gathered(this.pc, ms);
    },

    // Internal side: no ICE server, so its only candidates are host ones and it makes no
    // allocation: it becomes a party only when told to (`party`).
    async answer(offer, ms) {
      this.pc = new RTCPeerConnection({ iceServers: [] });
      this.pc.addEventListener("datachannel", (event) => {
        const channel = event.channel;
        channel.addEventListener("message", (message) => channel.send(message.data));
      });
      await this.pc.setRemoteDescription({ type: "offer", sdp: offer });
      await this.pc.setLocalDescription();
      return gathered(this.pc, ms);
    },

    async accept(answer) {
      await this.pc.setRemoteDescription({ type: "answer", sdp: answer });
      return this.pc.connectionState;
    },

    // Internal side: an allocation on the edge's internal listener, from this host. Its
    // description goes nowhere; what counts is that the edge now knows an internal party at
    // this address. Resolves with the relay candidate once the allocation exists.
    async party(turn, ms) {
      this.partyPc = new RTCPeerConnection({ iceServers: [turnServer(turn)] });
      this.partyPc.createDataChannel("party");
      const relayed = new Promise((resolve) => {
        this.partyPc.addEventListener("icecandidate", (event) => {
          if (event.candidate && event.candidate.type === "relay") {
            resolve(event.candidate.candidate);
          }
        });
      });
      await this.partyPc.setLocalDescription();
      return within(ms, "the party's relay candidate", relayed);
    },

    // Resolves once the call is connected, or when it failed or `ms` passed, with what it
    // came to: the negative case expects not to connect, so a timeout is an answer here.
    async connected(ms) {
      const started = performance.now();
      const settled = () => ["connected", "failed", "closed"].includes(this.pc.connectionState);
      if (!settled()) {
        await new Promise((resolve) => {
          const timer = setTimeout(resolve, ms);
          this.pc.addEventListener("connectionstatechange", () => {
            if (settled()) {
              clearTimeout(timer);
              resolve();
            }
          });
        });
      }
      return {
        connected: this.pc.connectionState === "connected",
        state: this.pc.connectionState,
        ice: this.pc.iceConnectionState,
        ms: Math.round(performance.now() - started),
      };
    },

    // External side: a nonce out and back (the internal side echoes it), so both directions
    // crossed the released permission.
    async roundTrip(ms) {
      await opened(this.channel, ms);
      // about:blank is not a secure context: no crypto.randomUUID, but getRandomValues.
      const nonce = `rampart-${crypto.getRandomValues(new Uint32Array(4)).join("-")}`;
      const echoed = nextMessage(this.channel, ms);
      this.channel.send(nonce);
      const reply = await echoed;
      if (reply !== nonce) throw new Error(`echoed ${JSON.stringify(reply)}, sent ${nonce}`);
      return reply;
    },

    // The candidate pair ICE selected, from getStats().
    async selectedPair() {
      const stats = await this.pc.getStats();
      const transport = [...stats.values()].find((s) => s.type === "transport");
      const pair = transport && stats.get(transport.selectedCandidatePairId);
      if (!pair) return null;
      return {
        state: pair.state,
        local: describe(stats, pair.localCandidateId),
        remote: describe(stats, pair.remoteCandidateId),
      };
    },

    // Every candidate pair and its state, for a failure message.
    async pairs() {
      const stats = await this.pc.getStats();
      return [...stats.values()]
        .filter((s) => s.type === "candidate-pair")
        .map((pair) => ({
          state: pair.state,
          local: describe(stats, pair.localCandidateId),
          remote: describe(stats, pair.remoteCandidateId),
          requestsSent: pair.requestsSent,
          responsesReceived: pair.responsesReceived,
        }));
    },

    close() {
      for (const pc of [this.pc, this.partyPc]) pc?.close();
      this.pc = this.channel = this.partyPc = null;
      return true;
    },
  };
  globalThis.call = call;
  return true;
})();
